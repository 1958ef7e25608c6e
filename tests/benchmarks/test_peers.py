"""The side-by-side benchmark's plan and report: the workloads it asks of the client, the
targets computed from known results, and the README block it rewrites."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import peers
from benchmarks.serving import peer_report


def _result(out: float, ttft99: float, tpot50: float, failed: int = 0) -> dict[str, Any]:
    return {
        "completed": 10,
        "failed": failed,
        "output_throughput": out,
        "request_throughput": 1.0,
        "request_goodput": 0.5,
        "p50_ttft_ms": ttft99 / 2,
        "p99_ttft_ms": ttft99,
        "p50_tpot_ms": tpot50,
        "p99_tpot_ms": tpot50 * 2,
        "p50_itl_ms": tpot50,
        "p99_itl_ms": tpot50 * 3,
    }


def _run(system: str, load: str, **kw: float) -> dict[str, Any]:
    return {"system": system, "workload": "random", "load": load, "result": _result(**kw)}


def test_the_plan_covers_the_workloads_and_enough_poisson_requests() -> None:
    full = peers.plan(quick=False)
    points = {(w.name, w.load) for w in full}
    assert {("random", "c1"), ("random", "c16"), ("random", "c64")} <= points
    assert {("chat", "c16"), ("shared-prefix", "c16")} <= points
    poisson = [w for w in full if w.load.startswith("poisson@")]
    assert len(poisson) >= 2
    for w in poisson:
        assert int(w.args[w.args.index("--num-prompts") + 1]) >= 200
        assert "--max-concurrency" not in w.args
    random_runs = [w for w in full if w.name in ("random", "shared-prefix")]
    assert all("--ignore-eos" in w.args for w in random_runs)
    chat = next(w for w in full if w.name == "chat")
    assert "--ignore-eos" not in chat.args and "/v1/chat/completions" in chat.args
    assert len(peers.plan(quick=True)) == len(full)


def test_targets_from_known_results() -> None:
    runs = [
        _run("ours-fp32", "c1", out=30.0, ttft99=100.0, tpot50=25.0),
        _run("vllm-fp32", "c1", out=15.0, ttft99=100.0, tpot50=50.0),
        _run("ours-fp32", "c16", out=100.0, ttft99=1000.0, tpot50=60.0),
        _run("vllm-fp32", "c16", out=80.0, ttft99=4000.0, tpot50=90.0),
        _run("ours-int4", "c1", out=40.0, ttft99=100.0, tpot50=20.0),
        _run("llamacpp-q4_1", "c1", out=50.0, ttft99=50.0, tpot50=16.0, failed=1),
        _run("ours-int4", "c16", out=160.0, ttft99=1000.0, tpot50=60.0),
        _run("llamacpp-q4_1", "c16", out=100.0, ttft99=1000.0, tpot50=60.0),
    ]
    rows = {r["target"]: r for r in peer_report.targets(runs, {"ours-fp32": {"bound_tok_s": 50}})}
    c1 = rows["ours-fp32 / vllm-fp32 output tok/s at c1"]
    assert c1["measured"] == pytest.approx(2.0) and c1["met"]
    c16 = rows["ours-fp32 / vllm-fp32 output tok/s at c16"]
    assert c16["measured"] == pytest.approx(1.25) and not c16["met"]
    ttft = rows["ours-fp32 / vllm-fp32 TTFT p99 at c16"]
    assert ttft["measured"] == pytest.approx(0.25) and ttft["met"]
    assert "ours-fp32 / vllm-fp32 output tok/s at c64" not in rows  # not measured
    decode = rows["ours-int4 / llamacpp-q4_1 single-stream decode (1/TPOT p50)"]
    assert decode["measured"] == pytest.approx(0.8) and not decode["met"]
    assert rows["ours-int4 / llamacpp-q4_1 output tok/s at c16"]["met"]
    roof = rows["ours-fp32 batch-1 decode / memory-bandwidth bound"]
    assert roof["measured"] == pytest.approx(0.8) and roof["met"]
    failed = rows["failed requests, all runs"]
    assert failed["measured"] == 1 and not failed["met"]
    table = peer_report.targets_table(list(rows.values()))
    assert "| ours-fp32 / vllm-fp32 TTFT p99 at c16 | 0.25 | <= 0.5 | met |" in table
    assert "| failed requests, all runs | 1.00 | <= 0 | missed |" in table


def test_splice_replaces_only_the_marked_block() -> None:
    text = "intro\n<!-- b -->\nold\nlines\n<!-- e -->\nafter\n"
    assert peer_report.splice(text, "new\n", "<!-- b -->", "<!-- e -->") == (
        "intro\n<!-- b -->\nnew\n<!-- e -->\nafter\n"
    )
    with pytest.raises(ValueError, match="not found"):
        peer_report.splice("no markers", "x", "<!-- b -->", "<!-- e -->")


def test_unknown_system_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        peers.main(["--systems", "ours-fp32,tgi"])
    assert "unknown systems ['tgi']" in capsys.readouterr().err
