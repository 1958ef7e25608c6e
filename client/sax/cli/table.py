"""ASCII box tables in the style of Go's tablewriter (as Saxml's saxutil prints them).

    +---+-----------+
    | # |   Cell    |
    +---+-----------+
    | 0 | /sax/test |
    +---+-----------+

Headers are centred and keep their case (saxutil's scripts grep for "Model Path"); numbers are
right-aligned, other cells left-aligned; cells with newlines span several lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _center(text: str, width: int) -> str:
    gap = width - len(text)
    left = gap // 2
    return " " * left + text + " " * (gap - left)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The table as text (lines joined by newlines, with a final newline)."""
    titles = [str(h) for h in headers]
    cells = [[str(c).split("\n") for c in row] for row in rows]
    widths = [len(t) for t in titles]
    for row in cells:
        if len(row) != len(widths):
            raise ValueError(f"row has {len(row)} cells, the table {len(widths)} columns")
        for i, lines in enumerate(row):
            widths[i] = max([widths[i], *(len(line) for line in lines)])
    border = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [
        border,
        "|" + "|".join(f" {_center(t, w)} " for t, w in zip(titles, widths, strict=True)) + "|",
    ]
    out.append(border)
    for row in cells:
        height = max((len(lines) for lines in row), default=1)
        for k in range(height):
            parts = []
            for lines, w in zip(row, widths, strict=True):
                line = lines[k] if k < len(lines) else ""
                parts.append(f" {line.rjust(w) if _NUMBER_RE.match(line) else line.ljust(w)} ")
            out.append("|" + "|".join(parts) + "|")
    out.append(border)
    return "\n".join(out) + "\n"
