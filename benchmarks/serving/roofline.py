"""The memory-bandwidth roofline of decode: the machine's bandwidth, measured in the same run,
and the bytes one decode step must read (weights plus the attended KV cache)."""

from __future__ import annotations

import time
from typing import Any

import torch


def measure_bandwidth(size_mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GB/s of reading a float32 tensor of `size_mib` MiB (a sum) and of
    copying it (read + write bytes), with torch's threads. The tensor is far larger than the
    caches."""
    n = size_mib * (1 << 20) // 4
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    read = copy = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        read = min(read, time.perf_counter() - t)
        t = time.perf_counter()
        y.copy_(x)
        copy = min(copy, time.perf_counter() - t)
    nbytes = x.numel() * 4
    return {
        "read_gb_s": nbytes / read / 1e9,
        "copy_gb_s": 2 * nbytes / copy / 1e9,
        "size_mib": float(size_mib),
        "threads": float(torch.get_num_threads()),
    }


def decode_step_bytes(config: Any, context: int, batch: int = 1) -> dict[str, int]:
    """Bytes one decode step of `batch` rows reads, each attending to `context` positions: every
    weight once (the tied output projection counted once; one embedding row per token) plus each
    row's K/V."""
    est = config.memory_estimate()
    elem = 4 if config.dtype == "float32" else 2
    embed = config.vocab_size * config.model_dim * elem
    weights = est.weight_bytes
    if not config.architecture().tie_embeddings:
        weights -= embed  # the embedding table is looked up, not read
    kv = batch * context * est.kv_bytes_per_token
    return {"weights": int(weights), "kv_cache": int(kv), "total": int(weights + kv)}


def roofline(bandwidth_gb_s: float, step_bytes: int, measured_tok_s: float | None) -> dict:
    """The batch-1 bound (tokens/s if only memory traffic counted) and the share reached."""
    bound = bandwidth_gb_s * 1e9 / step_bytes
    return {
        "bound_tok_s": bound,
        "measured_tok_s": measured_tok_s,
        "share_of_bound": (measured_tok_s / bound) if measured_tok_s else None,
    }
