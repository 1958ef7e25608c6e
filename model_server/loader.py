"""The one loader: servable config + checkpoint -> a servable, for the model server, the tests
and the benchmarks.

Every model is served by the engine (`EngineServable`) over a backend's runner: TinyLM (test
mode, random weights) on the numpy backend, Llama configs on torch or JAX, BLOOM configs on
torch. Backends are
imported only when a config needs them, so loading a TinyLM imports neither torch nor JAX.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from model_server.engine.engine_servable import EngineServable
from model_server.engine.runner import Runner
from sax.errors import FailedPreconditionError
from servables import platform
from servables.checkpoint import Checkpoint, open_checkpoint
from servables.servable_config import ServableConfig
from servables.servable_config import check_checkpoint as check_architecture

logger = logging.getLogger(__name__)

# Load phase name -> seconds, filled in by `build_servable` when given.
Timings = MutableMapping[str, float]


def device_for(chip: str) -> str:
    """The torch device of a platform chip: "cuda" for GPUs, "cpu" otherwise."""
    return "cuda" if chip in platform.GPU_CHIPS else "cpu"


def default_backend(chip: str) -> str:
    """The engine of a platform when --backend is not given: "jax" on TPUs, else "torch"."""
    return "jax" if chip in platform.TPU_CHIPS else "torch"


def _eos_ids(ckpt: Checkpoint) -> list[int]:
    eos = ckpt.config.get("eos_token_id")
    return [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])


def _torch_runner(config: Any, ckpt: Checkpoint, chip: str) -> Runner:
    import torch

    from model_server.backends.torch.torch_runner import build_runner
    from model_server.backends.torch.weights import resolve_dtype

    device = device_for(chip)
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, torch.device(device)))
    tensors = ckpt.iter_tensors(device=device, dtype=getattr(torch, config.dtype))
    return build_runner(config, tensors, device)


def _jax_runner(config: Any, ckpt: Checkpoint, chip: str) -> Runner:
    from model_server.backends.jax.jax_runner import load_runner

    return load_runner(config, ckpt)


_BACKENDS: dict[str, Callable[[Any, Checkpoint, str], Runner]] = {
    "torch": _torch_runner,
    "jax": _jax_runner,
}


def build_servable(
    config: ServableConfig,
    checkpoint_path: str,
    chip: str = "cpu",
    backend: str = "",
    *,
    timings: Timings | None = None,
) -> EngineServable:
    """Builds the servable of a config (blocking: reads weights). Test-mode configs ignore the
    checkpoint. `backend` is "torch", "jax" or "" (`default_backend` of the chip); `timings`
    receives the seconds of each load phase. FAILED_PRECONDITION when no backend serves the
    config's type, or the checkpoint is incomplete or does not fit the config."""
    from servables.configs.test import TinyLM
    from servables.decoder_config import DecoderConfig

    times: Timings = {} if timings is None else timings
    started = time.perf_counter()
    if isinstance(config, TinyLM):
        from model_server.backends.numpy.tiny_runner import TinyRunner
        from model_server.models.tiny_numpy import ByteTokenizer

        servable = EngineServable(config, TinyRunner(config), ByteTokenizer())
        times["build_s"] = time.perf_counter() - started
        return servable
    if not isinstance(config, DecoderConfig):
        raise FailedPreconditionError(
            f"no engine can serve configs of type {type(config).__name__} "
            f"(checkpoint {checkpoint_path!r})"
        )
    from model_server.engine.tokenizer import Tokenizer

    name = backend or default_backend(chip)
    if name not in _BACKENDS:
        raise FailedPreconditionError(f"unknown backend {name!r}; use one of {sorted(_BACKENDS)}")
    ckpt = open_checkpoint(checkpoint_path)
    check_architecture(config, ckpt.config, ckpt.path)
    tokenizer = Tokenizer.from_dir(ckpt.tokenizer_dir())
    times["checkpoint_open_s"] = time.perf_counter() - started
    t = time.perf_counter()
    runner = _BACKENDS[name](config, ckpt, chip)
    times["read_and_place_weights_s"] = time.perf_counter() - t
    servable = EngineServable(config, runner, tokenizer, eos_ids=_eos_ids(ckpt))
    logger.info(
        "built %s from %s with %s on %s in %.2f s",
        type(config).__name__,
        ckpt.path,
        name,
        chip,
        time.perf_counter() - started,
    )
    return servable
