"""Load with real processes: 2,000 Generate calls at concurrency 64 through the `sax` client to a
model server serving TinyLM (no failures, resident memory flat), then 100 cancelled calls to
SmolLM2 on the batching engine (streams dropped after their first item, and deadlines that pass
mid-generation) leave no KV cache slot in use."""

from __future__ import annotations

import re
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

import sax
from tests.faults.report import record
from tests.integration.cluster import Cluster, wait_for

TINY = "/sax/test/tiny"
SMOL = "/sax/test/smollm2"
SMOL_OVERRIDES = (
    "INPUT_SEQ_LEN=64",
    "BUCKET_KEYS=[64]",
    "BATCH_SIZE=[1,4,8]",
    "MAX_DECODE_STEPS=256",
)
CONCURRENCY = 64
WARMUP = 500
REQUESTS = 2000
CANCELLED = 100


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    r = c.saxutil("create", c.cell)
    assert r.returncode == 0, r.stderr
    yield c
    c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not in the metrics"
    return float(m.group(1))


def run_all(n: int, call: Callable[[int], None]) -> tuple[list[float], list[str]]:
    """Runs call(i) for i < n on CONCURRENCY threads; returns the latencies of the successes
    and the errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.monotonic()
        try:
            call(i)
        except Exception as e:  # noqa: BLE001 - counted and shown by the assertion
            with lock:
                errors.append(repr(e))
            return
        with lock:
            latencies.append(time.monotonic() - started)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(n)))
    return latencies, errors


class _DroppedError(Exception):
    """Raised by a stream callback to drop the stream after its first item."""


@pytest.mark.slow
def test_load_and_cancellations(
    cluster: Cluster, smollm2_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    c.start_admin()
    port = free_port()
    server = c.start_model_server(f"--metrics_port={port}")
    r = c.saxutil("publish", TINY, "test.TinyLM", "None", "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: c.ready_addresses(TINY), 60, "TinyLM to load", interval=0.2)
    process = psutil.Process(server.popen.pid)

    tiny = sax.Model(TINY).LM()
    options = sax.ModelOptions()
    options.SetTimeout(60)
    options.SetExtraInput("per_example_max_decode_steps", 8)

    def generate(i: int) -> None:
        assert tiny.Generate(f"request {i}: ", options)

    _, errors = run_all(WARMUP, generate)
    assert not errors, errors[:5]
    rss_before = process.memory_info().rss
    started = time.monotonic()
    latencies, errors = run_all(REQUESTS, generate)
    elapsed = time.monotonic() - started
    rss_after = process.memory_info().rss
    failed = len(errors)
    assert not failed, f"{failed} of {REQUESTS} failed: {errors[:5]}"
    growth = rss_after / rss_before - 1
    assert growth < 0.10, f"RSS grew {growth:.1%}: {rss_before} -> {rss_after} bytes"
    quantiles = statistics.quantiles(latencies, n=100)
    p50, p99 = quantiles[49], quantiles[98]

    # Cancellations on the batching engine: every one must give its cache slot back.
    r = c.saxutil("publish", SMOL, "llama.SmolLM2_135M", smollm2_checkpoint, "1", *SMOL_OVERRIDES)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: c.ready_addresses(SMOL), 120, "SmolLM2 to load", interval=0.2)
    smol = sax.Model(SMOL).LM()
    slots = metric(port, "sax_model_server_cache_slots", SMOL)
    assert slots == 8

    def cancelled(i: int) -> None:
        opts = sax.ModelOptions()
        # Greedy SmolLM2 may end these prompts at once; without EOS each runs 256 steps, long
        # after the deadline or the dropped stream.
        opts.SetExtraInput("ignore_eos", 1)
        if i % 2:  # a deadline that passes while the engine generates
            opts.SetTimeout(0.5)
            with pytest.raises(sax.errors.DeadlineExceededError):
                smol.Generate(f"Tell me a long story number {i}.", opts)
            return
        opts.SetTimeout(60)
        seen: list[int] = []

        def callback(last: bool, items: list) -> None:
            seen.append(1)
            raise _DroppedError

        with pytest.raises(_DroppedError):
            smol.GenerateStream(f"Tell me a long story number {i}.", callback, opts)
        assert seen == [1]

    _, errors = run_all(CANCELLED, cancelled)
    assert not errors, errors[:5]
    cancels_done = time.monotonic()

    def slots_in_use() -> float:
        return metric(port, "sax_model_server_cache_slots_used", SMOL) + metric(
            port, "sax_model_server_queue_depth", SMOL
        )

    wait_for(lambda: slots_in_use() == 0, 30, "every slot back", interval=0.05)
    freed_s = time.monotonic() - cancels_done
    assert metric(port, "sax_model_server_running_requests", SMOL) == 0
    # The engine still serves.
    opts = sax.ModelOptions()
    opts.SetExtraInput("per_example_max_decode_steps", 4)
    assert smol.Generate("Hello", opts)
    record(
        "load: 2,000 requests at concurrency 64, then 100 cancelled",
        "TinyLM through the sax client with no failures and flat resident memory; cancelled "
        "streams and passed deadlines on SmolLM2 (batching engine) give their KV cache slots back",
        {
            "requests": f"{REQUESTS} at concurrency {CONCURRENCY}",
            "failed": f"{failed}",
            "throughput": f"{REQUESTS / elapsed:.0f} req/s",
            "latency": f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms",
            "model server RSS": f"{rss_before / 2**20:.0f} MiB after warm-up, "
            f"{rss_after / 2**20:.0f} MiB at the end ({growth:+.1%})",
            "cancelled": f"{CANCELLED} (half streams dropped after the first item, half 0.5 s "
            "deadlines)",
            "cache slots in use after": f"0 of {slots:.0f} ({freed_s:.2f} s after the last "
            "cancelled call returned)",
        },
        test="tests/faults/test_load.py::test_load_and_cancellations",
    )
