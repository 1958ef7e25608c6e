"""The memory arithmetic shared by the configs, `saxutil estimate` and placement."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sax.errors import InvalidArgumentError
from servables import registry
from servables.configs.llama import LlamaArchitecture
from servables.memory import estimate_config, estimate_memory, tensor_bytes

LLAMA_NAMES = [n for n in registry.names() if n.startswith("llama.")]


@pytest.mark.parametrize("name", LLAMA_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_estimate_matches_the_config_methods(name: str, dtype: str, quantization: str) -> None:
    config = dataclasses.replace(registry.get(name), dtype=dtype, quantization=quantization)
    e = estimate_config(config)
    assert e.weight_bytes == config.weight_bytes()
    assert e.kv_bytes_per_token == config.kv_cache_bytes_per_token()
    assert e.total_bytes == config.memory_bytes()
    arch = config.architecture()
    assert sum(math.prod(s) for s in arch.tensor_shapes().values()) == config.num_params()
    assert arch.kv_bytes_per_token(dtype) == e.kv_bytes_per_token


def test_smollm2_figures() -> None:
    config = registry.get("llama.SmolLM2_135M")
    e = estimate_config(config, dtype="bfloat16", batch_size=2, seq_len=100)
    assert e.largest_layer == "model.embed_tokens"
    assert e.largest_layer_bytes == 49152 * 576 * 2
    assert e.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert e.kv_cache_bytes == e.kv_bytes_per_token * 200
    assert e.activation_bytes == 100 * (4 * 49152 + 3 * 1536 * 2)
    assert e.fits(e.total_bytes) and not e.fits(e.total_bytes - 1)


def test_llama2_7b_weights() -> None:
    e = estimate_config(registry.get("llama.LLaMA7BFP16"))
    assert e.weight_bytes == 6_738_415_616 * 2  # Llama 2 7B's parameter count, bfloat16
    assert e.largest_layer == "model.layers.0"


def test_int8_quantizes_only_decoder_layer_matrices() -> None:
    assert tensor_bytes("model.layers.0.mlp.up_proj.weight", (8, 4), "bfloat16", "int8") == 32 + 16
    assert tensor_bytes("model.embed_tokens.weight", (8, 4), "bfloat16", "int8") == 64
    assert tensor_bytes("model.layers.0.input_layernorm.weight", (4,), "float32", "int8") == 16


def test_int4_takes_half_a_byte_a_value_and_four_bytes_a_group() -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    assert tensor_bytes(name, (8, 64), "float32", "int4") == 8 * 64 // 2 + 8 * 2 * 4
    assert tensor_bytes(name, (8, 64), "float32", "int4", group_size=64) == 256 + 8 * 4
    assert tensor_bytes("model.embed_tokens.weight", (8, 64), "bfloat16", "int4") == 1024


def test_the_lm_head_takes_its_own_quantization() -> None:
    head = ("lm_head.weight", (8, 64), "bfloat16")
    assert tensor_bytes(*head, "int8") == 8 * 64 + 8 * 2
    assert tensor_bytes(*head, "int4", head_quantization="none") == 8 * 64 * 2
    assert tensor_bytes(*head, "none", head_quantization="int4") == 8 * 32 + 8 * 2 * 4
    smol = registry.get("llama.SmolLM2_135M")  # tied: a quantized copy beside the float table
    v, d = 49152, 576
    off = dataclasses.replace(smol, lm_head_quantization="none")
    for head, head_bytes in (("int8", v * d + v * 4), ("int4", v * d // 2 + v * 18 * 4)):
        on = dataclasses.replace(smol, lm_head_quantization=head)
        for quantization in ("int8", "int4"):
            assert (
                estimate_config(on, quantization=quantization).weight_bytes
                - estimate_config(off, quantization=quantization).weight_bytes
                == head_bytes
            )
        assert estimate_config(on) == estimate_config(off)  # QUANTIZATION none: a float head
    c7 = registry.get("llama.LLaMA7BFP16")  # untied: the quantized head replaces the float one
    on = estimate_config(c7, quantization="int4")
    off = estimate_config(dataclasses.replace(c7, lm_head_quantization="none"), quantization="int4")
    assert off.weight_bytes - on.weight_bytes == 32000 * 4096 * 2 - (32000 * 4096 + 32000 * 2)


def test_int4_smollm2_weights() -> None:
    smol = registry.get("llama.SmolLM2_135M")
    fp32, int8, int4 = (
        estimate_config(smol, quantization=q).weight_bytes for q in ("none", "int8", "int4")
    )
    # The float32 embedding table (113 MB) stays; the layers take 0.625 byte a value at group
    # size 32, the head (int8) 1: 538 MB, 249 MB and 208 MB.
    assert int4 < int8 < fp32 and int4 < 0.4 * fp32


def test_shape_from_hf_config_and_checkpoint_shapes() -> None:
    hf = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    shape = LlamaArchitecture.from_hf_config(hf)
    assert shape.num_kv_heads == 4 and not shape.tie_embeddings
    assert (shape.head_dim, shape.rope_theta, shape.norm_eps, shape.max_seq_len) == (
        8,
        10000.0,
        1e-6,
        2048,
    )  # transformers' LlamaConfig defaults
    shapes = shape.tensor_shapes()
    assert shapes["lm_head.weight"] == (100, 32)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 32)
    doubled = {n: (2 * s[0], *s[1:]) for n, s in shapes.items()}
    e = estimate_memory(shape, dtype="float32", tensor_shapes=doubled)
    assert e.weight_bytes == 2 * estimate_memory(shape, dtype="float32").weight_bytes


def test_refusals() -> None:
    with pytest.raises(InvalidArgumentError, match="has no architecture"):
        estimate_config(registry.get("test.TinyLM"))
    with pytest.raises(InvalidArgumentError, match="num_hidden_layers"):
        LlamaArchitecture.from_hf_config({"hidden_size": 4})
    shape = LlamaArchitecture(1, 1, 1, 4, 8, 10, tie_embeddings=True)
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        estimate_memory(shape, dtype="int4")
    with pytest.raises(InvalidArgumentError, match="unknown quantization"):
        estimate_memory(shape, dtype="float32", quantization="fp8")


def test_dtype_auto_is_estimated_as_float32() -> None:
    base = registry.get("llama.SmolLM2_135M")
    auto = dataclasses.replace(base, dtype="auto")
    auto.validate()
    assert estimate_config(auto) == dataclasses.replace(
        estimate_config(dataclasses.replace(base, dtype="float32")), dtype="auto"
    )
    with pytest.raises(InvalidArgumentError, match="float16 or auto"):
        dataclasses.replace(base, dtype="int4").validate()
