"""The serving benchmark: its summary statistics, and a small run of our engine in-process on
the real SmolLM2 checkpoint (`benchmarks/serve.py --quick --systems inprocess`)."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest

from benchmarks import serve
from benchmarks.serving import report
from benchmarks.serving.request_stats import RequestResult, aggregate, percentile, summarize


def test_percentiles_match_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 100):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": 3.97, "n": 4}
    assert summarize([]) is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_aggregate_of_known_requests() -> None:
    # Sent at 0 s; chunks at 1, 1.5, 3 s; ended at 3 s with 3 tokens.
    a = RequestResult(start=0.0, end=3.0, chunk_times=[1.0, 1.5, 3.0], output_tokens=3)
    # Sent at 1 s; one chunk at 2 s; ended at 4 s with 5 tokens (a non-streaming tail).
    b = RequestResult(start=1.0, end=4.0, chunk_times=[2.0], output_tokens=5)
    failed = RequestResult(start=0.0, end=0.5, error="UnavailableError: gone")
    out = aggregate([a, b, failed], wall=4.0)
    assert (out["requests"], out["completed"], out["failures"]) == (3, 2, 1)
    assert out["errors"] == ["UnavailableError: gone"]
    assert out["output_tokens"] == 8
    assert out["output_throughput"] == pytest.approx(2.0)
    assert out["request_throughput"] == pytest.approx(0.5)
    assert out["ttft"]["mean"] == pytest.approx(1.0)  # 1 s and 1 s
    assert out["tpot"]["p50"] == pytest.approx(0.75)  # (3-1)/2 = 1.0 and (4-2)/4 = 0.5
    assert out["decode_tok_s"] == pytest.approx(1 / 0.75)
    assert (out["itl"]["mean"], out["itl"]["n"]) == (pytest.approx(1.0), 2)  # gaps 0.5, 1.5
    assert out["e2e"]["p50"] == pytest.approx(3.0)


def test_targets_read_the_runs() -> None:
    def run(system: str, load: int, tok_s: float, decode: float) -> dict:
        summary = {"output_throughput": tok_s, "decode_tok_s": decode}
        return {"system": system, "workload": "random", "load": load, "summary": summary}

    runs = [
        run("ours (gRPC)", 1, 30.0, 30.0),
        run("ours (gRPC)", 16, 300.0, 20.0),
        run("ours (in-process)", 16, 320.0, 21.0),
        run("HF transformers", 1, 20.0, 20.0),
        run("HF transformers", 16, 150.0, 10.0),
    ]
    rows = {r["target"]: r for r in report.targets(runs, {"share_of_bound": 0.5})}
    single = rows["single-stream decode, ours / HF generate"]
    assert single["measured"] == pytest.approx(1.5) and single["met"] is False
    assert rows["conc-16 output tok/s, ours / HF static batch 16"]["measured"] == 2.0
    cost = rows["gRPC + client cost vs in-process at conc 16"]
    assert cost["measured"] == pytest.approx(1 - 300 / 320) and cost["met"] is True
    assert rows["conc-16 output tok/s, ours / llama.cpp"]["met"] is None  # not run


@pytest.mark.slow
def test_quick_in_process_run(smollm2_checkpoint: str, tmp_path) -> None:
    out = tmp_path / "results"
    serve.main(
        ["--quick", "--systems", "inprocess", "--out", str(out), "--checkpoint", smollm2_checkpoint]
    )
    data = json.loads((out / "serve.json").read_text())
    runs = {(r["system"], r["load"]): r["summary"] for r in data["runs"]}
    assert set(runs) == {("ours (in-process)", 1), ("ours (in-process)", 4)}
    plan = serve.QUICK
    for (_, load), s in runs.items():
        n = plan.requests_at(load)
        assert (s["completed"], s["failures"]) == (n, 0), s["errors"]
        # End-of-sequence is ignored: every request yields exactly output_len tokens.
        assert s["output_tokens"] == n * plan.output_len
        assert 0 < s["ttft"]["p50"] <= s["e2e"]["p50"]
        assert s["tpot"]["p50"] > 0 and s["itl"]["n"] >= n * (plan.output_len - 2)
    assert data["bandwidth"]["read_gb_s"] > 0
    roof = data["roofline"]
    assert roof["step_bytes"]["weights"] > 500e6  # SmolLM2-135M in float32
    assert roof["share_of_bound"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "serve.png").stat().st_size > 1000
    assert "ours (in-process)" in (out / "serve.txt").read_text()
