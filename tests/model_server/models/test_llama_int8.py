"""Weight-only int8 (QUANTIZATION=int8): per-output-channel quantization, the int8 linear, and
a quantized model close to its float32 original, with the memory the estimate predicts
(`servables/memory.py`: the layers' 2-D weights in int8, everything else in the config dtype)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model_server.backends.torch.quantize import Int8Weight
from model_server.backends.torch.weights import build_model
from servables.configs.llama import LlamaConfig
from tests.model_server.backends.torch.test_quantize import served_bytes

TINY = LlamaConfig(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    model_dim=64,
    hidden_dim=128,
    vocab_size=301,
    tie_embeddings=True,
    max_seq_len=256,
    dtype="float32",
    batch_sizes=(1, 2, 4),
    bucket_keys=(16,),
    input_seq_len=16,
    max_decode_steps=16,
)


def random_state(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f, hd = config.model_dim, config.hidden_dim, config.head_dim

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    state = {"model.embed_tokens.weight": torch.randn(config.vocab_size, d, generator=g)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = torch.ones(d)
        state[p + "self_attn.q_proj.weight"] = w(config.num_heads * hd, d)
        state[p + "self_attn.k_proj.weight"] = w(config.num_kv_heads * hd, d)
        state[p + "self_attn.v_proj.weight"] = w(config.num_kv_heads * hd, d)
        state[p + "self_attn.o_proj.weight"] = w(d, config.num_heads * hd)
        state[p + "post_attention_layernorm.weight"] = torch.ones(d)
        state[p + "mlp.gate_proj.weight"] = w(f, d)
        state[p + "mlp.up_proj.weight"] = w(f, d)
        state[p + "mlp.down_proj.weight"] = w(d, f)
    state["model.norm.weight"] = torch.ones(d)
    if not config.tie_embeddings:
        state["lm_head.weight"] = w(config.vocab_size, d)
    return state


def test_quantization_is_per_output_channel_and_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    q = Int8Weight.quantize(weight)
    assert q.values.dtype == torch.int8 and q.values.shape == (48, 64)
    assert q.scales.shape == (48,)
    # Each row uses its full range and is reconstructed to within half a quantization step.
    assert (q.values.abs().amax(dim=1) == 127).all()
    error = (q.dequantize(torch.float32) - weight).abs()
    assert (error <= q.scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 64])  # the int8 kernel, and dequantize-then-multiply
def test_int8_linear_matches_the_dequantized_product(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    q = Int8Weight.quantize(torch.randn(96, 64, generator=g))
    x = torch.randn(2, rows, 64, generator=g)
    out = q.linear(x)
    assert out.shape == (2, rows, 96) and out.dtype == torch.float32
    ref = x @ q.dequantize(torch.float32).T
    # bfloat16 activations in the kernel: relative error around 1e-2.
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("tied", [True, False])
def test_int8_model_is_close_to_float32_and_its_memory_matches_the_estimate(tied: bool) -> None:
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    state = random_state(config)
    fp32 = build_model(config, state.items())
    int8_config = dataclasses.replace(config, quantization="int8")
    int8 = build_model(int8_config, state.items())
    assert served_bytes(fp32) == config.weight_bytes()
    assert served_bytes(int8) == int8_config.weight_bytes()
    assert int8_config.weight_bytes() < 0.6 * config.weight_bytes()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, config.vocab_size, (4, 12), generator=g)
    with torch.inference_mode():
        a, b = fp32(tokens), int8(tokens)  # [4, 12, V]
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert (cosine > 0.99).all(), cosine
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert agree > 0.8, agree


@pytest.mark.slow
def test_smollm2_int8_greedy_tokens_stay_close(smollm2_checkpoint: str) -> None:
    from model_server.backends.torch.torch_runner import build_runner
    from model_server.engine.tokenizer import Tokenizer
    from servables import registry
    from servables.checkpoint import open_checkpoint

    base = registry.get("llama.SmolLM2_135M")
    assert isinstance(base, LlamaConfig)
    config = dataclasses.replace(base, input_seq_len=64, bucket_keys=(64,), max_decode_steps=16)
    ckpt = open_checkpoint(smollm2_checkpoint)
    tokenizer = Tokenizer.from_dir(ckpt.tokenizer_dir())
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?"]
    questions += ["Why is the sky blue?", "Write a haiku about rain.", "Who wrote Hamlet?"]
    prompts = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
        for q in questions
    ]

    def greedy(quantization: str) -> tuple[list[list[int]], torch.Tensor]:
        cfg = dataclasses.replace(config, quantization=quantization)
        runner = build_runner(cfg, ckpt.iter_tensors(), num_slots=len(prompts))
        try:
            first = [
                torch.from_numpy(runner.prefill_logits(i, p, all_logits=False))[0]
                for i, p in enumerate(prompts)
            ]
            out = [[int(row.argmax())] for row in first]
            for _ in range(7):
                positions = [len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True)]
                logits = torch.from_numpy(
                    runner.decode_logits(range(len(prompts)), [o[-1] for o in out], positions)
                )
                for o, row in zip(out, logits, strict=True):
                    o.append(int(row.argmax()))
            return out, torch.stack(first)
        finally:
            runner.close()

    ref, ref_logits = greedy("none")
    got, got_logits = greedy("int8")
    same_first = sum(a[:4] == b[:4] for a, b in zip(ref, got, strict=True))
    assert same_first >= len(prompts) - 1, (ref, got)
    cosine = torch.nn.functional.cosine_similarity(ref_logits, got_logits)
    assert (cosine > 0.98).all(), cosine
