"""The benchmark's outputs: a text table (each ratio ours / baseline), the targets of the issue
with their verdicts, and a PNG of output throughput against latency per system."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

OURS = "ours (gRPC)"
Run = Mapping[str, Any]  # {"system", "workload", "mode", "load", "summary": aggregate(...)}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _p(summary: Mapping[str, Any], key: str, q: str = "p50") -> float | None:
    part = summary.get(key)
    return None if part is None else part[q]


def find(
    runs: Sequence[Run], system: str, workload: str = "random", load: Any = None
) -> Run | None:
    """The run of a system on a workload at a load (a concurrency, or "poisson@<rate>")."""
    for run in runs:
        if run["system"] == system and run["workload"] == workload and run["load"] == load:
            return run
    return None


def table(runs: Sequence[Run], reference: str) -> str:
    """One line per run; the last column is the run's output throughput over the reference
    system's at the same workload and load (ours / baseline when the reference is ours)."""
    head = (
        f"{'system':<22} {'workload':<8} {'load':>10} {'ok':>5} {'fail':>4} {'req/s':>6} "
        f"{'out tok/s':>9} {'TTFT p50':>8} {'TTFT p99':>8} {'TPOT p50':>8} {'ITL p99':>8} "
        f"{'E2E p50':>8} {'ours/this':>9}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        s = run["summary"]
        ref = find(runs, reference, run["workload"], run["load"])
        ratio = "-"
        if ref is not None and run["system"] != reference and s["output_throughput"] > 0:
            ratio = f"{ref['summary']['output_throughput'] / s['output_throughput']:.2f}x"
        lines.append(
            f"{run['system']:<22} {run['workload']:<8} {run['load']!s:>10} {s['completed']:>5} "
            f"{s['failures']:>4} {s['request_throughput']:>6.2f} {s['output_throughput']:>9.1f} "
            f"{_fmt(_p(s, 'ttft'), 1e3, 0):>6}ms {_fmt(_p(s, 'ttft', 'p99'), 1e3, 0):>6}ms "
            f"{_fmt(_p(s, 'tpot'), 1e3, 1):>6}ms {_fmt(_p(s, 'itl', 'p99'), 1e3, 0):>6}ms "
            f"{_fmt(_p(s, 'e2e'), 1, 2):>7}s {ratio:>9}"
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(runs: Sequence[Run], roof: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets: each with the measured value, the goal and whether it is met
    (None when a figure is missing, e.g. a skipped baseline)."""

    def out(system: str, load: Any) -> float | None:
        run = find(runs, system, "random", load)
        return None if run is None else run["summary"]["output_throughput"]

    def decode(system: str) -> float | None:
        run = find(runs, system, "random", 1)
        return None if run is None else run["summary"]["decode_tok_s"]

    grpc16, inproc16 = out(OURS, 16), out("ours (in-process)", 16)
    cost = None if not (grpc16 and inproc16) else 1 - grpc16 / inproc16
    share = None if roof is None else roof.get("share_of_bound")
    hf, cpp, int8 = "HF transformers", "llama.cpp", "ours int8 (in-process)"
    rows = [
        ("single-stream decode, ours / HF generate", _ratio(decode(OURS), decode(hf)), ">=", 2.0),
        ("conc-16 output tok/s, ours / HF static batch 16", _ratio(grpc16, out(hf, 16)), ">=", 3.0),
        ("conc-16 output tok/s, ours / llama.cpp", _ratio(grpc16, out(cpp, 16)), ">=", 1.5),
        ("gRPC + client cost vs in-process at conc 16", cost, "<=", 0.10),
        ("batch-1 decode share of the bandwidth bound", share, ">=", 0.60),
        (
            "int8 batch-1 decode, ours / llama.cpp Q4_1",
            _ratio(decode(int8), decode(cpp)),
            ">=",
            1.0,
        ),
    ]
    result = []
    for name, value, op, goal in rows:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        result.append({"target": name, "measured": value, "goal": f"{op} {goal:g}", "met": met})
    return result


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'target':<50} {'measured':>9} {'goal':>8}  verdict"]
    for r in rows:
        value = "-" if r["measured"] is None else f"{r['measured']:.2f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[r["met"]]
        lines.append(f"{r['target']:<50} {value:>9} {r['goal']:>8}  {verdict}")
    return "\n".join(lines)


def plot(runs: Sequence[Run], path: pathlib.Path) -> bool:
    """Output tokens/s against median end-to-end latency, one line per system over the
    fixed-concurrency random runs; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=80)
    systems = sorted({r["system"] for r in runs})
    for system in systems:
        points = [
            (r["summary"]["output_throughput"], _p(r["summary"], "e2e"), r["load"])
            for r in runs
            if r["system"] == system and r["workload"] == "random" and isinstance(r["load"], int)
        ]
        points = [p for p in points if p[1] is not None]
        if not points:
            continue
        points.sort(key=lambda p: p[2])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        for x, y, c in points:
            ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("median end-to-end latency (s)")
    ax.set_title("prompt 128 / output 128 tokens; labels: concurrency", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
