"""Llama servable configs: registered names, Saxml tutorial values, overrides and estimates."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables import memory, registry
from servables.configs.llama import LlamaArchitecture, LlamaConfig
from servables.servable_config import apply_overrides, check_checkpoint

NAMES = (
    "llama.LLaMA7BFP16",
    "llama.LLaMA7BFP16TPUv5e",
    "llama.LLaMA7BFP16GPU",
    "llama.LLaMA13BFP16",
    "llama.LLaMA13BFP16TPUv5e",
    "llama.LLaMA13BFP16GPU",
    "llama.LLaMA70BFP16",
    "llama.LLaMA70BFP16TPUv5e",
    "llama.LLaMA70BFP16GPU",
    "llama.SmolLM2_135M",
)
EXTRA_INPUT_KEYS = {
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "per_example_max_decode_steps",
    "seed",
    "stop",
    "ignore_eos",
    "speculative_tokens",
}


def llama(name: str) -> LlamaConfig:
    config = registry.get(name)
    assert isinstance(config, LlamaConfig)
    return config


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_extra_inputs_and_fitting_positions(name: str) -> None:
    config = llama(name)
    assert name in registry.names()
    config.validate()
    assert set(config.extra_inputs) == EXTRA_INPUT_KEYS
    assert isinstance(config.extra_inputs["stop"], str)
    assert all(isinstance(v, float) for k, v in config.extra_inputs.items() if k != "stop"), (
        config.extra_inputs
    )
    assert config.input_seq_len + config.max_decode_steps <= config.max_seq_len
    assert config.extra_inputs["per_example_max_decode_steps"] >= 1


@pytest.mark.parametrize(
    ("name", "params", "layers", "heads", "kv_heads", "dim", "hidden"),
    [
        ("llama.LLaMA7BFP16", 6_738_415_616, 32, 32, 32, 4096, 11008),
        ("llama.LLaMA13BFP16", 13_015_864_320, 40, 40, 40, 5120, 13824),
        ("llama.LLaMA70BFP16", 68_976_648_192, 80, 64, 8, 8192, 28672),
    ],
)
def test_llama2_architectures(
    name: str, params: int, layers: int, heads: int, kv_heads: int, dim: int, hidden: int
) -> None:
    config = llama(name)
    got = (config.num_layers, config.num_heads, config.num_kv_heads, config.model_dim)
    assert got == (layers, heads, kv_heads, dim)
    assert config.hidden_dim == hidden
    assert (config.vocab_size, config.rope_theta, config.norm_eps) == (32000, 10000.0, 1e-5)
    assert (config.max_seq_len, config.head_dim, config.tie_embeddings) == (4096, 128, False)
    assert config.num_params() == params  # the published Llama 2 parameter counts
    assert config.dtype == "bfloat16"
    assert config.weight_bytes() == 2 * params


def test_tutorial_tpu_v5e_variants() -> None:
    c7 = llama("llama.LLaMA7BFP16TPUv5e")
    assert c7.ici_mesh_shape == (1, 1, 4)
    assert (c7.batch_sizes, c7.bucket_keys, c7.max_decode_steps) == ((1,), (128,), 32)
    c13 = llama("llama.LLaMA13BFP16TPUv5e")
    assert (c13.batch_sizes, c13.bucket_keys, c13.max_decode_steps) == ((1,), (128,), 32)
    assert c13.ici_mesh_shape == (1, 1, 8)
    c70 = llama("llama.LLaMA70BFP16TPUv5e")
    assert c70.ici_mesh_shape == (1, 1, 16)
    assert c70.num_kv_heads == 8
    for config in (c7, c13, c70):
        assert config.chips == frozenset({"tpuv5e"})
        assert config.dtype == "bfloat16"
        assert config.num_samples == 1


def test_smollm2_config() -> None:
    c = llama("llama.SmolLM2_135M")
    arch = (c.num_layers, c.num_heads, c.num_kv_heads, c.model_dim, c.hidden_dim, c.vocab_size)
    assert arch == (30, 9, 3, 576, 1536, 49152)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings) == (100000.0, 1e-5, True)
    assert c.dtype == "float32"
    assert c.ici_mesh_shape == (1, 1, 1)
    assert "cpu" in c.chips and "h100" in c.chips and "tpuv5e" not in c.chips
    assert c.num_params() == 134_515_008
    assert c.extra_inputs["temperature"] == 0.0  # greedy unless a request asks otherwise


def test_saxml_override_names_apply() -> None:
    config = llama("llama.LLaMA7BFP16TPUv5e")
    new = apply_overrides(
        config,
        {
            "BATCH_SIZE": "4",
            "BUCKET_KEYS": "[128,256]",
            "MAX_DECODE_STEPS": "64",
            "INPUT_SEQ_LEN": "256",
            "NUM_SAMPLES": "2",
            "ICI_MESH_SHAPE": "[1,1,8]",
            "TRUNCATE_PROMPT": "true",
            "MAX_QUEUE": "8",
            "EXTRA_INPUTS": '{"temperature": 0.0, "stop": ""}',
        },
    )
    assert isinstance(new, LlamaConfig)
    assert new.batch_sizes == (4,)
    assert new.bucket_keys == (128, 256)
    assert (new.max_decode_steps, new.input_seq_len, new.num_samples) == (64, 256, 2)
    assert new.ici_mesh_shape == (1, 1, 8)
    assert (new.truncate_prompt, new.max_queue) == (True, 8)
    assert dict(new.extra_inputs) == {"temperature": 0.0, "stop": ""}
    assert config.batch_sizes == (1,)  # the registered config is unchanged
    batch = apply_overrides(config, {"BATCH_SIZE": "[1,2,4]", "num_layers": "2"})
    assert batch.batch_sizes == (1, 2, 4)
    assert isinstance(batch, LlamaConfig) and batch.num_layers == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"NUM_DECODERS": "2"}, "unknown override key 'NUM_DECODERS'"),
        ({"BATCH_SIZE": '"four"'}, "wrong type"),
        ({"TRUNCATE_PROMPT": "1"}, "wrong type"),
        ({"INPUT_SEQ_LEN": "4096"}, "exceeds the model's 4096 positions"),
        ({"NUM_KV_HEADS": "5"}, "not a multiple of num_kv_heads"),
        ({"MAX_QUEUE": "0"}, "max_queue must be positive"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        apply_overrides(llama("llama.LLaMA7BFP16"), overrides)


def test_can_serve_on() -> None:
    smol = llama("llama.SmolLM2_135M")
    assert smol.can_serve_on("cpu", "1")
    assert smol.can_serve_on("h100", "1")
    assert not smol.can_serve_on("cpu", "4")
    assert not smol.can_serve_on("tpuv5e", "1")
    v7 = llama("llama.LLaMA7BFP16TPUv5e")
    assert v7.can_serve_on("tpuv5e", "2x2")
    assert not v7.can_serve_on("tpuv5e", "2x4")
    assert not v7.can_serve_on("cpu", "4")
    assert llama("llama.LLaMA13BFP16TPUv5e").can_serve_on("tpuv5e", "2x4")
    assert llama("llama.LLaMA70BFP16TPUv5e").can_serve_on("tpuv5e", "4x4")
    assert llama("llama.LLaMA7BFP16").can_serve_on("cpu", "1")
    assert llama("llama.LLaMA70BFP16GPU").can_serve_on("a100", "4")
    assert not llama("llama.LLaMA70BFP16GPU").can_serve_on("cpu", "4")


def test_memory_estimate() -> None:
    c7 = llama("llama.LLaMA7BFP16")
    assert c7.kv_cache_bytes_per_token() == 2 * 32 * 32 * 128 * 2
    assert llama("llama.LLaMA70BFP16").kv_cache_bytes_per_token() == 2 * 80 * 8 * 128 * 2
    smol = llama("llama.SmolLM2_135M")
    assert smol.kv_cache_bytes_per_token() == 2 * 30 * 3 * 64 * 4
    kv = smol.kv_cache_bytes_per_token() * 16 * (1024 + 256)
    assert smol.memory_bytes() == smol.weight_bytes() + kv + smol.activation_bytes()
    assert smol.weight_bytes() == 4 * smol.num_params()
    bigger = apply_overrides(smol, {"BATCH_SIZE": "[1,32]"})
    assert bigger.memory_bytes() - smol.memory_bytes() == kv
    assert apply_overrides(smol, {"RAM": "12345"}).memory_bytes() == 12345
    int8 = apply_overrides(c7, {"QUANTIZATION": '"int8"'})
    assert 0.5 < int8.weight_bytes() / c7.weight_bytes() < 0.55
    int4 = apply_overrides(c7, {"QUANTIZATION": '"int4"'})  # 0.5 byte + 4 bytes per 32 values
    assert 0.3 < int4.weight_bytes() / c7.weight_bytes() < 0.35
    for config in (c7, smol, int8, int4):  # one source of truth for the admin and the CLI
        assert config.memory_bytes() == memory.estimate_config(config).total_bytes


def test_config_module_does_not_import_torch() -> None:
    code = (
        "import sys; from servables import registry; "
        "registry.get('llama.SmolLM2_135M'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_architecture_is_the_config_fields() -> None:
    smol = llama("llama.SmolLM2_135M")
    arch = smol.architecture()
    assert isinstance(arch, LlamaArchitecture)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert (arch.rope_theta, arch.norm_eps, arch.max_seq_len) == (100000.0, 1e-5, 8192)
    assert arch.num_params() == smol.num_params()
    assert apply_overrides(smol, {"NUM_LAYERS": "2"}).architecture().num_layers == 2
    with pytest.raises(InvalidArgumentError, match="num_layers must be positive"):
        LlamaArchitecture(0, 9, 3, 576, 1536, 49152).validate()


def test_hugging_face_config_round_trip() -> None:
    arch = llama("llama.LLaMA70BFP16").architecture()
    hf = arch.to_hf_config()
    assert hf["num_key_value_heads"] == 8 and hf["rms_norm_eps"] == 1e-5
    assert "head_dim" not in hf  # model_dim // num_heads
    assert LlamaArchitecture.from_hf_config(hf) == arch
    wide = LlamaArchitecture(2, 4, 2, 32, 64, 100, head_dim=16)
    assert wide.to_hf_config()["head_dim"] == 16
    assert wide.tensor_shapes()["model.layers.0.self_attn.q_proj.weight"] == (64, 32)
    assert LlamaArchitecture.from_hf_config(wide.to_hf_config()) == wide


def test_a_checkpoint_of_another_shape_is_refused() -> None:
    config = llama("llama.LLaMA13BFP16")
    seven_b = llama("llama.LLaMA7BFP16").architecture().to_hf_config()
    check_checkpoint(config, {**config.architecture().to_hf_config(), "extra": 1}, "/c")
    check_checkpoint(config, {"num_hidden_layers": 40}, "/c")  # absent keys are not compared
    message = (
        "checkpoint /c has num_hidden_layers=32 but the config LLaMA13BFP16 has num_layers=40; "
        "publish it with the config that matches the checkpoint"
    )
    with pytest.raises(FailedPreconditionError, match=f"^{message}$"):
        check_checkpoint(config, seven_b, "/c")
    check_checkpoint(registry.get("test.TinyLM"), seven_b, "/c")  # no architecture: no check
