"""Load generators: a fixed number of concurrent callers (closed loop) and Poisson arrivals at
a rate (open loop), over any `System` that streams one request at a time."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from benchmarks.serving.request_stats import RequestResult
from benchmarks.serving.workload import Prompt

# on_chunk(text, prefix_len): the caller's text becomes text_so_far[:prefix_len] + text.
ChunkCallback = Callable[[str, int], None]


class System(Protocol):
    """A serving system under test."""

    name: str

    def stream(self, prompt: Prompt, on_chunk: ChunkCallback) -> int | None:
        """Runs one request to its end, calling on_chunk for every streamed chunk; returns the
        number of output tokens when the system reports it (None: re-tokenize the text)."""
        ...


def run_request(
    system: System, prompt: Prompt, count_tokens: Callable[[str], int]
) -> RequestResult:
    """One request, timed; an exception becomes the result's error."""
    result = RequestResult(start=time.perf_counter(), prompt_tokens=len(prompt.token_ids))
    text = ""

    def on_chunk(piece: str, prefix_len: int) -> None:
        nonlocal text
        result.chunk_times.append(time.perf_counter())
        text = text[:prefix_len] + piece

    try:
        reported = system.stream(prompt, on_chunk)
    except Exception as e:  # noqa: BLE001 - a failed request is a figure of the run
        result.end = time.perf_counter()
        result.error = f"{type(e).__name__}: {str(e)[:200]}"
        return result
    result.end = time.perf_counter()
    result.text = text
    if reported is not None:
        result.output_tokens = reported
    elif prompt.fixed_output:
        result.output_tokens = prompt.max_tokens
    else:
        result.output_tokens = count_tokens(text)
    if not result.chunk_times:  # nothing streamed: the whole answer came at the end
        result.chunk_times.append(result.end)
    return result


def fixed_concurrency(
    system: System,
    prompts: Sequence[Prompt],
    concurrency: int,
    count_tokens: Callable[[str], int],
) -> tuple[list[RequestResult], float]:
    """`concurrency` callers, each sending its next prompt when the previous one is answered,
    until all prompts are done. Returns the results (prompt order) and the wall time."""
    results: list[RequestResult | None] = [None] * len(prompts)
    lock = threading.Lock()
    next_index = 0

    def caller() -> None:
        nonlocal next_index
        while True:
            with lock:
                i = next_index
                next_index += 1
            if i >= len(prompts):
                return
            results[i] = run_request(system, prompts[i], count_tokens)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(caller) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def poisson(
    system: System,
    prompts: Sequence[Prompt],
    rate: float,
    count_tokens: Callable[[str], int],
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """Sends the prompts at exponentially distributed gaps of mean 1/rate seconds (each on its
    own thread, however many are in flight). Returns the results and the wall time."""
    rng = random.Random(seed)
    results: list[RequestResult | None] = [None] * len(prompts)

    def send(i: int) -> None:
        results[i] = run_request(system, prompts[i], count_tokens)

    start = time.perf_counter()
    arrival = start
    with ThreadPoolExecutor(max_workers=max(1, len(prompts))) as pool:
        futures = []
        for i in range(len(prompts)):
            delay = arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, i))
            arrival += rng.expovariate(rate)
        for f in futures:
            f.result()
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall
