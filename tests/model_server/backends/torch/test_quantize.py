"""Weight-only int4 (QUANTIZATION=int4) and the quantized output projection: group-wise
quantization and its error, the int4 kernel against the dequantized product, and runners whose
logits stay close to the float model's, with the memory the estimate predicts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_server.backends.torch.quantize import Int4Weight, Int8Weight
from model_server.backends.torch.torch_runner import build_runner
from model_server.backends.torch.weights import build_model
from sax.errors import InvalidArgumentError
from servables import registry
from servables.configs.llama import LlamaConfig
from servables.servable_config import apply_overrides
from tests.model_server.backends.torch.test_torch_runner import CONFIG, random_weights

INT4 = dataclasses.replace(CONFIG, quantization="int4")
# int4 throughout, the output projection too.
ALL_INT4 = dataclasses.replace(INT4, lm_head_quantization="int4")


def _weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes, some offset from zero (asymmetric groups)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 1, rows)[:, None]
    return (torch.randn(rows, columns, generator=g) + torch.randn(rows, 1, generator=g)) * scale


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step(group_size: int) -> None:
    weight = _weight(48, 256, seed=group_size)
    q = Int4Weight.quantize(weight, group_size)
    assert q.values.shape == (48, 128) and q.values.dtype == torch.uint8
    assert q.scales_and_zeros.shape == (256 // group_size, 48, 2)
    values = q.unpacked_values()
    assert int(values.min()) == 0 and int(values.max()) == 15
    scales, zeros = q.scales_and_zeros.float().unbind(-1)  # [K / G, N]
    step = scales.t().repeat_interleave(group_size, dim=1)  # [N, K]
    offset = zeros.t().abs().repeat_interleave(group_size, dim=1)
    error = (q.dequantize(torch.float32) - weight).abs()
    # Half a step, plus what rounding the scale and zero to bfloat16 (2^-9 relative) moves the
    # ends of a group: at most 8 steps and the zero, each by 2^-9.
    assert (error <= step / 2 + (8 * step + offset) * 2**-8).all()
    # Gaussian groups: the error's rms is about step / sqrt(12), well under 10% of the weight.
    rows = weight.norm(dim=1)
    assert ((q.dequantize(torch.float32) - weight).norm(dim=1) < 0.12 * rows).all()


@pytest.mark.parametrize("rows", [1, 3, 16, 130])  # decode and prefill sizes
@pytest.mark.parametrize("shape", [(96, 64), (40, 64)])  # packed for the kernel; plain
def test_int4_linear_matches_the_dequantized_product(rows: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(rows)
    q = Int4Weight.quantize(torch.randn(*shape, generator=g), 32).packed()
    assert q.kernel_packed == (shape[0] % 16 == 0)
    x = torch.randn(2, rows, shape[1], generator=g)
    out = q.linear(x)
    assert out.shape == (2, rows, shape[0]) and out.dtype == torch.float32
    ref = x @ q.dequantize(torch.float32).T
    # The kernel takes bfloat16 activations and returns bfloat16: about 3e-3 of the largest
    # output; the plain form multiplies in float32.
    bound = 1e-2 if q.kernel_packed else 1e-5
    assert (out - ref).abs().max() <= bound * ref.abs().max()


def test_packed_and_plain_forms_hold_the_same_weight() -> None:
    plain = Int4Weight.quantize(_weight(64, 96, seed=3), 32)
    packed = plain.packed()
    assert packed.kernel_packed and not plain.kernel_packed
    assert packed.nbytes() == plain.nbytes() == 64 * 48 + 3 * 64 * 4
    assert torch.equal(packed.unpacked_values(), plain.unpacked_values())
    assert torch.equal(packed.dequantize(torch.float32), plain.dequantize(torch.float32))
    parts = [Int4Weight.quantize(_weight(n, 96, seed=n), 32) for n in (32, 16, 16)]
    fused = Int4Weight.cat([parts[0].packed(), parts[1], parts[2]]).packed()
    expected = torch.cat([p.dequantize(torch.float32) for p in parts])
    assert torch.equal(fused.dequantize(torch.float32), expected)


def test_bad_group_sizes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="must be one of"):
        Int4Weight.quantize(torch.randn(16, 64), 16)
    with pytest.raises(InvalidArgumentError, match="does not divide a weight's 96"):
        Int4Weight.quantize(torch.randn(16, 96), 64)
    smol = registry.get("llama.SmolLM2_135M")
    int4 = {"QUANTIZATION": '"int4"'}
    apply_overrides(smol, {**int4, "QUANTIZATION_GROUP_SIZE": "64"}).validate()
    with pytest.raises(InvalidArgumentError, match=r"does not divide model_dim 576.*\[32, 64\]"):
        apply_overrides(smol, {**int4, "QUANTIZATION_GROUP_SIZE": "128"})
    with pytest.raises(InvalidArgumentError, match="must be one of"):
        apply_overrides(smol, {**int4, "QUANTIZATION_GROUP_SIZE": "48"})
    with pytest.raises(InvalidArgumentError, match="none, int8 or int4"):
        apply_overrides(smol, {"QUANTIZATION": '"int2"'})


def _logits(config: LlamaConfig, prompts: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill logits [P, T, V] of each prompt and 8 greedy tokens after each, by a runner."""
    runner = build_runner(config, random_weights(config).items(), num_slots=len(prompts))
    try:
        logits = torch.stack(
            [torch.from_numpy(runner.prefill_logits(i, p)) for i, p in enumerate(prompts)]
        )
        out = [[int(row[-1].argmax())] for row in logits]
        for _ in range(7):
            positions = [len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True)]
            step = runner.decode_logits(range(len(prompts)), [o[-1] for o in out], positions)
            for o, row in zip(out, torch.from_numpy(step), strict=True):
                o.append(int(row.argmax()))
        return logits, out
    finally:
        runner.close()


@pytest.mark.parametrize("vocab", [101, 112])  # the head plain (101 rows) or kernel-packed
def test_int4_runner_is_close_to_the_float_model(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    prompts = [torch.randint(0, vocab, (20,), generator=g).tolist() for _ in range(4)]
    ref, ref_tokens = _logits(dataclasses.replace(CONFIG, vocab_size=vocab), prompts)
    got, got_tokens = _logits(dataclasses.replace(ALL_INT4, vocab_size=vocab), prompts)
    # Each int4 matrix (groups of 32) carries about 8% rms error (step / sqrt(12), the step
    # about 0.27 of a Gaussian group's std); the head's and the layers' add up to about 15% of
    # the logits' norm on average, 30% at most (measured): the bounds leave room for both.
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # [P, T]
    assert rel.mean() < 0.25 and rel.max() < 0.5, rel
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert (cosine > 0.9).all(), cosine
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.8, agree
    same_first = sum(a[:3] == b[:3] for a, b in zip(ref_tokens, got_tokens, strict=True))
    assert same_first >= len(prompts) - 1, (ref_tokens, got_tokens)


def served_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight the model holds: float parameters and quantized weights."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Int8Weight | Int4Weight):
                total += value.nbytes()
    return total


@pytest.mark.parametrize(
    ("quantization", "head"), [("int8", "int8"), ("int4", "int8"), ("int4", "int4")]
)
@pytest.mark.parametrize("tied", [True, False])
def test_the_head_is_quantized_and_the_memory_matches_the_estimate(
    quantization: str, head: str, tied: bool
) -> None:
    config = dataclasses.replace(
        CONFIG, tie_embeddings=tied, quantization=quantization, lm_head_quantization=head
    )
    state = random_weights(config)
    model = build_model(config, state.items())
    assert isinstance(model.head, Int8Weight if head == "int8" else Int4Weight)
    # The float head is gone (a storage-less stand-in keeps the dtype); tied, the float
    # embeddings stay for the lookup.
    assert model.lm_head.weight.is_meta and model.lm_head.weight.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert served_bytes(model) == config.weight_bytes()
    float_config = dataclasses.replace(config, quantization="none")
    head_off = dataclasses.replace(config, lm_head_quantization="none")
    if tied:  # the quantized head is a copy beside the float table
        assert head_off.weight_bytes() < config.weight_bytes() < float_config.weight_bytes()
    else:  # it replaces the float head
        assert config.weight_bytes() < head_off.weight_bytes() < float_config.weight_bytes()
    off = build_model(head_off, state.items())
    assert off.head is None and not off.lm_head.weight.is_meta
    assert served_bytes(off) == head_off.weight_bytes()
    hidden = torch.randn(5, config.model_dim, generator=torch.Generator().manual_seed(4))
    fp32 = build_model(float_config, state.items())
    with torch.inference_mode():
        ref, got = fp32.logits(hidden), model.logits(hidden)
        torch.testing.assert_close(off.logits(hidden), ref)
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert (cosine > (0.999 if head == "int8" else 0.99)).all(), cosine


def test_the_default_head_is_int8_and_a_float_model_has_none() -> None:
    assert isinstance(build_model(INT4, random_weights(INT4).items()).head, Int8Weight)
    assert build_model(CONFIG, random_weights(CONFIG).items()).head is None
    with pytest.raises(InvalidArgumentError, match="LM_HEAD_QUANTIZATION"):
        apply_overrides(CONFIG, {"LM_HEAD_QUANTIZATION": '"fp8"'})
