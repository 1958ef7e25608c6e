"""Model implementations, and `build_servable`: config -> loaded `Servable`.

Imports of the implementations are lazy so that loading a TinyLM never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from model_server.params import platform
from model_server.params.base import ServableConfig
from model_server.servable import Servable
from sax.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

# LlamaConfig field -> metadata/config.json key of the checkpoint.
_ARCHITECTURE = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "model_dim": "hidden_size",
    "hidden_dim": "intermediate_size",
    "vocab_size": "vocab_size",
}


def device_for(chip: str) -> str:
    """The torch device of a platform chip: "cuda" for GPUs, "cpu" otherwise."""
    return "cuda" if chip in platform.GPU_CHIPS else "cpu"


def default_backend(chip: str) -> str:
    """The engine of a platform when --backend is not given: "jax" on TPUs, else "torch"."""
    return "jax" if chip in platform.TPU_CHIPS else "torch"


def build_servable(
    config: ServableConfig, checkpoint_path: str, chip: str = "cpu", backend: str = ""
) -> Servable:
    """Builds the servable of a config (blocking: reads weights). Test-mode configs ignore the
    checkpoint. `backend` is "torch", "jax" or "" (`default_backend` of the chip).
    FAILED_PRECONDITION when no engine serves the config's type, or the checkpoint is
    incomplete or does not fit the config."""
    from model_server.params.llama import LlamaConfig
    from model_server.params.test import TinyLM

    if isinstance(config, TinyLM):
        from model_server.models.tiny import TinyLMServable

        return TinyLMServable(config)
    if isinstance(config, LlamaConfig):
        if (backend or default_backend(chip)) == "jax":
            return _build_llama_jax(config, checkpoint_path)
        return _build_llama(config, checkpoint_path, device_for(chip))
    raise FailedPreconditionError(
        f"no engine can serve configs of type {type(config).__name__} "
        f"(checkpoint {checkpoint_path!r})"
    )


def check_architecture(config: Any, checkpoint_config: Mapping[str, Any], path: str) -> None:
    """FAILED_PRECONDITION naming the first architecture field where checkpoint and config
    disagree (e.g. a 7B checkpoint published with a 13B config)."""
    for field, key in _ARCHITECTURE.items():
        if key in checkpoint_config and checkpoint_config[key] != getattr(config, field):
            raise FailedPreconditionError(
                f"checkpoint {path} has {key}={checkpoint_config[key]} but the config "
                f"{type(config).__name__} has {field}={getattr(config, field)}; publish it with "
                "the config that matches the checkpoint"
            )


def _build_llama(config: Any, checkpoint_path: str, device: str) -> Servable:
    import torch

    from model_server.checkpoint import open_checkpoint
    from model_server.engine.runner import build_runner
    from model_server.engine.servable import EngineServable
    from model_server.engine.tokenizer import Tokenizer

    started = time.monotonic()
    ckpt = open_checkpoint(checkpoint_path)
    check_architecture(config, ckpt.config, ckpt.path)
    dtype = getattr(torch, config.dtype)
    runner = build_runner(config, ckpt.iter_tensors(device=device, dtype=dtype), device)
    eos = ckpt.config.get("eos_token_id")
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    tokenizer = Tokenizer.from_dir(ckpt.tokenizer_dir())
    logger.info(
        "built %s from %s on %s in %.2f s",
        type(config).__name__,
        ckpt.path,
        device,
        time.monotonic() - started,
    )
    return EngineServable(config, runner, tokenizer, eos_ids=eos_ids)


def _build_llama_jax(config: Any, checkpoint_path: str) -> Servable:
    from model_server.checkpoint import open_checkpoint
    from model_server.engine.jax_runner import load_runner
    from model_server.engine.servable import EngineServable
    from model_server.engine.tokenizer import Tokenizer

    started = time.monotonic()
    ckpt = open_checkpoint(checkpoint_path)
    check_architecture(config, ckpt.config, ckpt.path)
    tokenizer = Tokenizer.from_dir(ckpt.tokenizer_dir())
    runner = load_runner(config, ckpt)
    eos = ckpt.config.get("eos_token_id")
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    logger.info(
        "built %s from %s with JAX (mesh %s) in %.2f s",
        type(config).__name__,
        ckpt.path,
        list(config.ici_mesh_shape),
        time.monotonic() - started,
    )
    return EngineServable(config, runner, tokenizer, eos_ids=eos_ids)
