"""JAX tests run on eight host CPU devices: the device count is set here, when pytest imports
this folder, before any test initializes a JAX backend."""

from __future__ import annotations

import os

import pytest

jax = pytest.importorskip("jax")

DEVICES = 8

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", DEVICES)


@pytest.fixture(scope="session", autouse=True)
def eight_devices(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Fails early when JAX was started elsewhere with fewer devices; points the persistent
    compilation cache at a folder of the session (runners of equal shapes compile once) and
    returns it."""
    from model_server.backends.jax import jax_mesh

    assert jax.device_count() >= DEVICES, (
        f"JAX has {jax.device_count()} devices; run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
    )
    cache = str(tmp_path_factory.mktemp("jax-cache"))
    jax_mesh.configure(cache)
    return cache


TINY = dict(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    model_dim=64,
    hidden_dim=128,
    vocab_size=256,
    rope_theta=10000.0,
    max_seq_len=128,
    dtype="float32",
    batch_sizes=(1, 4),
    bucket_keys=(8,),
    input_seq_len=16,
    max_decode_steps=8,
)


def write_checkpoint(path, config, seed: int = 0, drop: str = "") -> str:
    """A checkpoint folder of random float32 weights for a Llama config (HF names and layout);
    `drop` leaves one tensor out."""
    import json
    import pathlib

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    c = config
    hd = c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.model_dim), "model.norm.weight": None}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.model_dim)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = None
        shapes[p + "post_attention_layernorm.weight"] = None
        shapes[p + "self_attn.q_proj.weight"] = (c.num_heads * hd, c.model_dim)
        shapes[p + "self_attn.k_proj.weight"] = (c.num_kv_heads * hd, c.model_dim)
        shapes[p + "self_attn.v_proj.weight"] = (c.num_kv_heads * hd, c.model_dim)
        shapes[p + "self_attn.o_proj.weight"] = (c.model_dim, c.num_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (c.hidden_dim, c.model_dim)
        shapes[p + "mlp.up_proj.weight"] = (c.hidden_dim, c.model_dim)
        shapes[p + "mlp.down_proj.weight"] = (c.model_dim, c.hidden_dim)
    tensors = {}
    for name, shape in shapes.items():
        if name == drop:
            continue
        if shape is None:  # norms near 1
            tensors[name] = (1 + 0.1 * rng.standard_normal(c.model_dim)).astype(np.float32)
        else:
            scale = 1.0 if "embed" in name else shape[1] ** -0.5
            tensors[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    root = pathlib.Path(path) / "checkpoint_00000000"
    for sub in ("metadata", "state", "tokenizer"):
        (root / sub).mkdir(parents=True)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(root / "state" / shard))
        weight_map.update({n: shard for n in members})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "state" / "model.safetensors.index.json").write_text(json.dumps(index))
    meta = {
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "hidden_size": c.model_dim,
        "intermediate_size": c.hidden_dim,
        "vocab_size": c.vocab_size,
    }
    (root / "metadata" / "config.json").write_text(json.dumps(meta))
    for marker in ("", "metadata/", "state/"):
        (root / f"{marker}commit_success.txt").write_text("ok")
    return str(root)


@pytest.fixture(scope="session")
def tiny_config():
    """A small random Llama config (2 layers, 4 query and 2 KV heads of 16, D 64, F 128)."""
    import dataclasses

    from servables.configs.llama import LlamaConfig

    return dataclasses.replace(LlamaConfig(), **TINY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory) -> str:
    """A checkpoint of random weights for `tiny_config`."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama"), tiny_config)


@pytest.fixture(scope="session")
def checkpoint_writer():
    """`write_checkpoint(path, config, seed=0, drop="")` for tests needing other weights."""
    return write_checkpoint
