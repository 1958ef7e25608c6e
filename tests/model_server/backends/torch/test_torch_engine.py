"""The engine over the torch runner's paged KV cache: a prompt that reuses a cached prefix, and
requests preempted when the cache runs out, give the same greedy tokens as cold runs alone."""

from __future__ import annotations

import dataclasses
import queue
import re
from collections.abc import Sequence

import torch

from model_server.backends.torch.torch_runner import build_runner
from model_server.engine.engine import Engine
from model_server.engine.request import Request, RequestKind, RequestOutput, SampleOptions
from servables.configs.llama import LlamaConfig
from tests.model_server.backends.torch.test_torch_runner import CONFIG, random_weights

PAGED = dataclasses.replace(CONFIG, kv_block_size=4)
STEPS = 10


def _text(tokens: Sequence[int]) -> str:
    return "".join(f"<{t}>" for t in tokens)


def prompts() -> list[tuple[int, ...]]:
    """Four prompts sharing a 16-token prefix (a system prompt), with their own tails."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, CONFIG.vocab_size, (16,), generator=g).tolist()
    tails = [torch.randint(0, CONFIG.vocab_size, (3 + i,), generator=g).tolist() for i in range(4)]
    return [tuple(shared + t) for t in tails]


def run(
    config: LlamaConfig,
    batch: Sequence[Sequence[tuple[int, ...]]],
    prefix_caching: bool = True,
    speculative_tokens: int = 0,
    steps: int = STEPS,
) -> tuple[list[list[int]], Engine]:
    """Greedy tokens of every prompt; `batch` holds groups submitted together, each group
    after the previous one is done."""
    runner = build_runner(config, random_weights(config).items(), num_slots=4)
    engine = Engine(
        runner,
        decode=_text,
        eos_ids=(),
        max_queue=8,
        max_batch_size=4,
        token_budget=64,
        prefix_caching=prefix_caching,
    )
    results: list[list[int]] = []
    try:
        for group in batch:
            sinks: list[queue.SimpleQueue[RequestOutput]] = []
            for prompt in group:
                sink: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
                request = Request(
                    engine.new_request_id(),
                    RequestKind.GENERATE,
                    prompt,
                    (SampleOptions(),),
                    max_decode_steps=steps,
                    speculative_tokens=speculative_tokens,
                )
                engine.submit(request, sink.put)
                sinks.append(sink)
            for sink in sinks:
                text, finished = "", False
                while not finished:
                    out = sink.get(timeout=120)
                    assert out.error is None, out.error
                    for sample in out.samples:
                        text = text[: sample.prefix_len] + sample.text
                    finished = out.finished
                results.append([int(t) for t in re.findall(r"<(\d+)>", text)])
        return results, engine
    finally:
        engine.close()
        runner.close()


def test_a_cached_prefix_gives_the_tokens_of_a_cold_run() -> None:
    first, *rest = prompts()
    cold, cold_engine = run(PAGED, [[p] for p in prompts()], prefix_caching=False)
    assert cold_engine.stats().prefix_hit_tokens == 0
    warm, engine = run(PAGED, [[first], rest])
    assert all(len(t) == STEPS for t in warm)
    assert warm == cold
    stats = engine.stats()
    # The later three prompts found the shared prefix's four full blocks cached.
    assert stats.prefix_hit_tokens == 3 * 16


def test_preempted_requests_give_the_tokens_of_cold_runs() -> None:
    cold, _ = run(PAGED, [[p] for p in prompts()], prefix_caching=False)
    # Room for 25 blocks: four requests of up to 8 blocks each do not fit at once.
    small = dataclasses.replace(PAGED, kv_cache_tokens=PAGED.slot_len)
    squeezed, engine = run(small, [prompts()], prefix_caching=False)
    assert engine.stats().preemptions >= 1
    assert squeezed == cold


def test_speculating_requests_give_the_tokens_of_plain_ones() -> None:
    """Drafts checked in the same pass as other samples' decode rows change no greedy token."""
    plain, _ = run(PAGED, [prompts()], prefix_caching=False, steps=24)
    drafted, engine = run(PAGED, [prompts()], prefix_caching=False, speculative_tokens=4, steps=24)
    stats = engine.stats()
    assert drafted == plain
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0
