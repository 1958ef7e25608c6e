"""The reliability report: scenarios record what happened and their measured figures, and the
session writes them into `docs/reliability.md` (one table row per scenario).

A run updates only the rows of the scenarios it ran; rows of scenarios not run are kept as the
file has them, so a partial run (`-k`) never drops a measured row. Figures are strings written
as measured ("takeover 6.1 s", "0 of 412 requests failed").

Usage in a test:

    from tests.faults.report import record
    record("admin leader killed", "standby takes over; clients retry", {"takeover": "6.1 s"})
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
_BEGIN = "<!-- scenarios: begin (written by tests/faults/report.py) -->"
_END = "<!-- scenarios: end -->"
_HEADER = (
    "| scenario | what happens | measured | test | last run |\n| --- | --- | --- | --- | --- |"
)

# scenario -> (what happens, figures, test id) recorded in this session.
_recorded: dict[str, tuple[str, dict[str, str], str]] = {}


def record(scenario: str, what_happens: str, figures: Mapping[str, str], test: str = "") -> None:
    """Records one scenario's outcome (the last call for a scenario wins)."""
    _recorded[scenario] = (what_happens, dict(figures), test)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _row(scenario: str, what: str, figures: Mapping[str, str], test: str, day: str) -> str:
    measured = "; ".join(f"{k}: {v}" for k, v in figures.items())
    return f"| {_cell(scenario)} | {_cell(what)} | {_cell(measured)} | {_cell(test)} | {day} |"


def _existing_rows(text: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    if _BEGIN not in text or _END not in text:
        return rows
    body = text.split(_BEGIN, 1)[1].split(_END, 1)[0]
    for line in body.splitlines():
        m = re.match(r"^\| (.+?) \| ", line)
        if m and not line.startswith("| ---") and m.group(1) != "scenario":
            rows[m.group(1)] = line
    return rows


def write(doc: Path = DOC) -> None:
    """Merges this session's records into the doc's scenario table (no-op when none)."""
    if not _recorded:
        return
    text = doc.read_text() if doc.exists() else ""
    rows = _existing_rows(text)
    day = datetime.date.today().isoformat()
    for scenario, (what, figures, test) in _recorded.items():
        rows[_cell(scenario)] = _row(scenario, what, figures, test, day)
    table = "\n".join([_BEGIN, _HEADER, *sorted(rows.values()), _END])
    if _BEGIN in text and _END in text:
        before = text.split(_BEGIN, 1)[0]
        after = text.split(_END, 1)[1]
        text = before + table + after
    else:
        text = (text.rstrip() + "\n\n" if text else "# Reliability\n\n") + table + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
