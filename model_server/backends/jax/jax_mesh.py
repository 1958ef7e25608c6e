"""The device mesh of a config, placement of host arrays onto it, and JAX's persistent
compilation cache.

The mesh takes the first prod(ICI_MESH_SHAPE) devices (of every process with `jax.distributed`)
in the shape [replica, data, model] (`llama_jax.MESH_AXES`; a shorter shape gets leading 1s).
`llama_jax.Layout` decides per config which dimensions split over "data" and "model".
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from model_server.models import llama_jax
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.configs.llama import LlamaConfig


def configure(cache_dir: str = "") -> None:
    """Sets JAX's persistent compilation cache folder (every compiled step is kept), so that a
    reload or a restarted server skips compilation."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def mesh_shape(config: LlamaConfig) -> tuple[int, int, int]:
    """ICI_MESH_SHAPE as [replica, data, model]; INVALID_ARGUMENT past three axes."""
    shape = tuple(config.ici_mesh_shape)
    if len(shape) > len(llama_jax.MESH_AXES):
        raise InvalidArgumentError(
            f"ICI_MESH_SHAPE {list(shape)} has more than 3 axes ({', '.join(llama_jax.MESH_AXES)})"
        )
    full = (1,) * (3 - len(shape)) + shape
    return full[0], full[1], full[2]


def build_mesh(config: LlamaConfig) -> Mesh:
    """The config's mesh over the first prod(ICI_MESH_SHAPE) devices (of all processes);
    FAILED_PRECONDITION when there are fewer."""
    shape = mesh_shape(config)
    n = int(np.prod(shape))
    devices = jax.devices()
    if len(devices) < n:
        raise FailedPreconditionError(
            f"the config's ICI_MESH_SHAPE {list(config.ici_mesh_shape)} needs {n} devices, this "
            f"server has {len(devices)} ({devices[0].platform}); publish with a smaller "
            "ICI_MESH_SHAPE or start the server on a larger slice"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices[:n])
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices[:n]).reshape(shape)
    return Mesh(grid, llama_jax.MESH_AXES)


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Puts a host array onto its shards (each process fills only its own devices)."""
    return jax.make_array_from_callback(
        array.shape, sharding, lambda index: np.ascontiguousarray(array[index])
    )
