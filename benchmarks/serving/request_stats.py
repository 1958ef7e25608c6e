"""Per-request timings and their summaries (mean, p50, p90, p99), as serving benchmarks report
them: time to first token (TTFT), time per output token after the first (TPOT), inter-token
latencies (ITL, the gaps between streamed chunks), end-to-end latency, request/s and output
tokens/s over the wall time of a run."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as its caller saw it; times are `time.perf_counter()` seconds."""

    # When the request was sent.
    start: float
    # When it ended (last chunk or error).
    end: float = 0.0
    # Arrival time of every streamed chunk that carried text (one per token for a streaming
    # server; all at `end` for a non-streaming one).
    chunk_times: list[float] = field(default_factory=list)
    # Output tokens generated (exact when the system reports it, else re-tokenized).
    output_tokens: int = 0
    prompt_tokens: int = 0
    # The error message of a failed request; None when it succeeded.
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.output_tokens < 2 or not self.chunk_times:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """{"mean", "p50", "p90", "p99", "n"} of the values, or None when there are none."""
    if not values:
        return None
    out: dict[str, float] = {"mean": sum(values) / len(values)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["n"] = len(values)
    return out


def aggregate(results: Sequence[RequestResult], wall: float) -> dict[str, Any]:
    """The figures of one run: counts, throughputs over `wall` seconds, latency summaries (s)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    return {
        "requests": len(results),
        "completed": len(ok),
        "failures": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "request_throughput": len(ok) / wall if wall > 0 else 0.0,
        "output_throughput": tokens / wall if wall > 0 else 0.0,
        "output_tokens": tokens,
        "ttft": summarize([t for r in ok if (t := r.ttft) is not None]),
        "tpot": summarize(tpots),
        # Single-stream decode speed: 1 / median TPOT.
        "decode_tok_s": 1 / percentile(tpots, 50) if tpots else None,
        "itl": summarize([x for r in ok for x in r.itls]),
        "e2e": summarize([r.e2e for r in ok]),
    }
