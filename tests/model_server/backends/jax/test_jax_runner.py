"""The JAX runner on a small random Llama: every sharding layout against the torch runner, and
the runner's checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_server.backends.jax.jax_runner import build_jax_runner
from model_server.backends.torch.torch_runner import build_runner
from model_server.models.llama_jax import Layout
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.checkpoint import open_checkpoint

PROMPTS = ([5, 17, 200, 3, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 7, 8])
STEPS = 6


def greedy(runner, prompts=PROMPTS) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefills each prompt into its slot, then decodes them together; returns the tokens and
    every step's logits (prefill logits first)."""
    logits = [torch.from_numpy(runner.prefill_logits(0, list(prompts[0])))]
    tokens = []
    for slot, prompt in enumerate(prompts):
        last = torch.from_numpy(runner.prefill_logits(slot, list(prompt), all_logits=False))
        tokens.append([int(last.argmax())])
    for step in range(STEPS):
        slots = list(range(len(prompts)))
        positions = [len(p) + step for p in prompts]
        out = torch.from_numpy(runner.decode_logits(slots, [t[-1] for t in tokens], positions))
        logits.append(out)
        for row, t in zip(out, tokens, strict=True):
            t.append(int(row.argmax()))
    return tokens, logits


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    runner = build_runner(tiny_config, ckpt.iter_tensors(dtype=torch.float32))
    try:
        return greedy(runner)
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("mesh", "attention"),
    [((1, 1, 2), "heads"), ((1, 2, 4), "head_dim"), ((1, 1, 3), "replicated")],
)
@pytest.mark.slow
def test_layouts_match_torch(tiny_config, tiny_checkpoint, reference, mesh, attention) -> None:
    config = dataclasses.replace(tiny_config, ici_mesh_shape=mesh)
    runner = build_jax_runner(config, open_checkpoint(tiny_checkpoint))
    try:
        assert runner.layout.attention == attention
        assert len(runner.mesh.devices.flat) == mesh[0] * mesh[1] * mesh[2]
        tokens, logits = greedy(runner)
        want_tokens, want_logits = reference
        assert tokens == want_tokens
        for got, want in zip(logits, want_logits, strict=True):
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    finally:
        runner.close()


def test_checks_and_copy_slot(tiny_config, tiny_checkpoint, eight_devices) -> None:
    import os

    runner = build_jax_runner(tiny_config, open_checkpoint(tiny_checkpoint), num_slots=3)
    try:
        assert os.listdir(eight_devices), "the persistent compilation cache stays empty"
        assert (runner.num_slots, runner.max_seq_len, runner.vocab_size) == (3, 24, 256)
        assert runner.buckets == (8, 24)
        with pytest.raises(InvalidArgumentError, match="slot 3"):
            torch.from_numpy(runner.prefill_logits(3, [1]))
        with pytest.raises(InvalidArgumentError, match="vocabulary"):
            torch.from_numpy(runner.prefill_logits(0, [256]))
        with pytest.raises(InvalidArgumentError, match="25 tokens"):
            torch.from_numpy(runner.prefill_logits(0, [1] * 25))
        with pytest.raises(InvalidArgumentError, match="distinct"):
            torch.from_numpy(runner.decode_logits([0, 0], [1, 1], [1, 1]))
        with pytest.raises(InvalidArgumentError, match="positions"):
            torch.from_numpy(runner.decode_logits([0], [1], [24]))
        prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # bucket 24
        torch.from_numpy(runner.prefill_logits(0, prompt, all_logits=False))
        runner.copy_slot(0, 2, len(prompt))
        a, b = torch.from_numpy(runner.decode_logits([0, 2], [7, 7], [len(prompt)] * 2))
        assert torch.equal(a, b)
        # More rows than the largest batch size run as several batches.
        rows = torch.from_numpy(
            runner.decode_logits([0, 1, 2], [7, 8, 9], [len(prompt), 0, len(prompt)])
        )
        assert rows.shape == (3, 256) and torch.allclose(rows[0], a, atol=1e-5)
    finally:
        runner.close()
    runner.close()  # twice is fine
    with pytest.raises(FailedPreconditionError, match="closed"):
        torch.from_numpy(runner.prefill_logits(0, [1]))


def test_bad_checkpoints_and_meshes(tiny_config, checkpoint_writer, tmp_path) -> None:
    missing = checkpoint_writer(
        tmp_path / "a", tiny_config, drop="model.layers.1.mlp.up_proj.weight"
    )
    with pytest.raises(FailedPreconditionError, match=r"lacks 1 tensors.*up_proj"):
        build_jax_runner(tiny_config, open_checkpoint(missing))
    other = dataclasses.replace(tiny_config, hidden_dim=96)
    with pytest.raises(FailedPreconditionError, match="shape"):
        build_jax_runner(other, open_checkpoint(checkpoint_writer(tmp_path / "b", tiny_config)))
    huge = dataclasses.replace(tiny_config, ici_mesh_shape=(1, 1, 64))
    with pytest.raises(FailedPreconditionError, match="needs 64 devices"):
        build_jax_runner(huge, open_checkpoint(checkpoint_writer(tmp_path / "c", tiny_config)))


def test_layout_of_each_config() -> None:
    from servables import registry

    def layout(name: str, mesh: tuple[int, int, int] | None = None) -> Layout:
        config = registry.get(name)
        shape = mesh or tuple(config.ici_mesh_shape)
        return Layout(config, shape[1], shape[2])

    assert layout("llama.LLaMA7BFP16TPUv5e").attention == "heads"  # 32 heads on 4
    assert layout("llama.LLaMA13BFP16TPUv5e").attention == "heads"  # 40 heads on 8
    seventy = layout("llama.LLaMA70BFP16TPUv5e")  # 64 heads, 8 KV heads on 16
    assert (seventy.attention, seventy.mlp) == ("head_dim", "hidden")
    smol = layout("llama.SmolLM2_135M", (1, 1, 8))  # 9 and 3 heads on 8
    assert (smol.attention, smol.mlp) == ("head_dim", "hidden")
    assert layout("llama.SmolLM2_135M", (1, 1, 3)).attention == "heads"
    assert "D split" in layout("llama.SmolLM2_135M", (1, 2, 4)).describe()
