"""Greedy parity on the real SmolLM2-135M: the JAX runner sharded over meshes 1x1x8 and 1x2x4
(8 host devices; 9 query and 3 KV heads do not divide 8 or 4, so attention splits the head
dimension) against the unsharded JAX run and the torch runner, 20 prompts decoded in batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_server.backends.jax.jax_runner import build_jax_runner
from model_server.backends.torch.torch_runner import build_runner
from model_server.engine.tokenizer import Tokenizer
from servables import registry
from servables.checkpoint import open_checkpoint

pytestmark = pytest.mark.slow

CONFIG = dataclasses.replace(
    registry.get("llama.SmolLM2_135M"),
    bucket_keys=(32,),
    input_seq_len=32,
    max_decode_steps=16,
    batch_sizes=(1, 4),
)
STEPS = 16
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, a",
    "The three primary colors are",
    "Water boils at",
    "import numpy as np\n",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "The quick brown fox",
    "In 1492, Columbus",
    "Photosynthesis is the process by which",
    "The opposite of hot is",
    "Q: What is 2 + 2?\nA:",
    "My favourite book is",
    "SELECT name FROM users WHERE",
    "The French word for cat is",
    "A haiku about the sea:\n",
    "The heart pumps blood through",
    "Machine learning is",
    "The Great Wall of China was built",
)


def greedy(runner, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations, four prompts per decode batch."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), 4):
        batch = prompts[start : start + 4]
        tokens = []
        for slot, prompt in enumerate(batch):
            tokens.append(
                [
                    int(
                        torch.from_numpy(
                            runner.prefill_logits(slot, prompt, all_logits=False)
                        ).argmax()
                    )
                ]
            )
        for step in range(STEPS - 1):
            logits = torch.from_numpy(
                runner.decode_logits(
                    list(range(len(batch))),
                    [t[-1] for t in tokens],
                    [len(p) + step for p in batch],
                )
            )
            for row, t in zip(logits, tokens, strict=True):
                t.append(int(row.argmax()))
        out.extend(tokens)
    return out


@pytest.fixture(scope="module")
def prompts(smollm2_checkpoint: str) -> list[list[int]]:
    tokenizer = Tokenizer.from_dir(open_checkpoint(smollm2_checkpoint).tokenizer_dir())
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    assert all(0 < len(p) <= 32 for p in encoded)
    return encoded


@pytest.fixture(scope="module")
def torch_tokens(smollm2_checkpoint: str, prompts) -> list[list[int]]:
    ckpt = open_checkpoint(smollm2_checkpoint)
    runner = build_runner(CONFIG, ckpt.iter_tensors(dtype=torch.float32))
    try:
        return greedy(runner, prompts)
    finally:
        runner.close()


def jax_tokens(checkpoint: str, prompts, mesh: tuple[int, ...]) -> list[list[int]]:
    config = dataclasses.replace(CONFIG, ici_mesh_shape=mesh)
    runner = build_jax_runner(config, open_checkpoint(checkpoint))
    try:
        return greedy(runner, prompts)
    finally:
        runner.close()


@pytest.fixture(scope="module")
def unsharded(smollm2_checkpoint: str, prompts) -> list[list[int]]:
    return jax_tokens(smollm2_checkpoint, prompts, (1, 1, 1))


def test_unsharded_matches_torch(unsharded, torch_tokens) -> None:
    same = sum(a == b for a, b in zip(unsharded, torch_tokens, strict=True))
    assert same >= 19, f"{same} of 20 prompts token-identical"


@pytest.mark.parametrize("mesh", [(1, 1, 8), (1, 2, 4)])
def test_sharded_matches_unsharded_and_torch(
    smollm2_checkpoint: str, prompts, unsharded, torch_tokens, mesh
) -> None:
    tokens = jax_tokens(smollm2_checkpoint, prompts, mesh)
    assert tokens == unsharded
    same = sum(a == b for a, b in zip(tokens, torch_tokens, strict=True))
    assert same >= 19, f"{same} of 20 prompts token-identical"
