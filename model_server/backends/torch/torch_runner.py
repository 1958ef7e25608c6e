"""The torch runner: the engine's `Runner` over a PyTorch Llama on CPU or CUDA.

It owns a Llama model and its static KV cache of `num_slots` slots of `max_seq_len` positions
(the config's INPUT_SEQ_LEN + MAX_DECODE_STEPS). Prompts are padded to the smallest bucket key
that holds them (the config's BUCKET_KEYS, or INPUT_SEQ_LEN, then the slot length for longer
sequences such as scored prefix + suffix), and the attended length of a decode step to a
multiple of SPAN_STEP (or the slot length), so the device sees few distinct shapes. Decode
batches run at their exact size (eager torch gains nothing from padding rows), in chunks of at
most the largest BATCH_SIZE; when a batch's slots are consecutive (the usual case: the lowest
free slot goes first) the cache is attended in place instead of gathered.

Every method runs under `torch.inference_mode`; logits come back as float32 numpy arrays and
are sampled on the host (`model_server.backends.logits_runner`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from model_server.backends.logits_runner import LogitsRunner, RunnerChecks, smallest_at_least
from model_server.backends.torch.weights import build_model
from model_server.models.llama_torch import LlamaForCausalLM
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.configs.llama import LlamaConfig

logger = logging.getLogger(__name__)

# Attended lengths of decode steps are multiples of this (or the slot length): attention reads
# at most this many positions more than the batch's longest sequence.
SPAN_STEP = 32


def resolve_devices(config: LlamaConfig, device: str | torch.device) -> list[torch.device]:
    """The devices of the model: on CUDA, one per device of the config's mesh (cuda:0..N-1
    when `device` names no index); elsewhere the one device."""
    dev = torch.device(device)
    n = config.num_devices()
    if dev.type != "cuda" or n == 1:
        return [dev]
    first = dev.index or 0
    available = torch.cuda.device_count()
    if first + n > available:
        raise FailedPreconditionError(
            f"the config's ICI_MESH_SHAPE {list(config.ici_mesh_shape)} needs {n} GPUs from "
            f"{dev}, this server has {available}; publish with a smaller ICI_MESH_SHAPE"
        )
    return [torch.device("cuda", first + i) for i in range(n)]


class TorchRunner(RunnerChecks, LogitsRunner):
    """The engine's `Runner` over `LlamaForCausalLM` (sampling on the host). Calls are
    serialized by a lock."""

    def __init__(self, config: LlamaConfig, model: LlamaForCausalLM, num_slots: int) -> None:
        super().__init__()
        self.config = config
        self._set_shapes(config, num_slots)
        self.spans = (*range(SPAN_STEP, self.max_seq_len, SPAN_STEP), self.max_seq_len)
        self._model: LlamaForCausalLM | None = model
        self._lock = threading.Lock()
        with torch.inference_mode():
            model.allocate_cache(num_slots, self.max_seq_len)
        self._input_device = model.devices[0]

    def _live(self) -> LlamaForCausalLM:
        if self._model is None:
            raise FailedPreconditionError("the runner was closed; load the model again")
        return self._model

    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True
    ) -> np.ndarray:
        n = len(tokens)
        padded = self._check_prefill(slot, tokens)
        ids = torch.zeros(padded, dtype=torch.long)
        ids[:n] = torch.tensor(list(tokens), dtype=torch.long)
        with self._lock, torch.inference_mode():
            model = self._live()
            hidden = model.prefill(ids.to(self._input_device), slot)  # [T, D]
            hidden = hidden[:n] if all_logits else hidden[n - 1 : n]
            return model.logits(hidden).cpu().numpy()

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        n = len(slots)
        self._check_decode(slots, tokens, positions)
        largest = self.batch_sizes[-1]
        with self._lock, torch.inference_mode():
            model = self._live()
            parts = [
                self._decode_batch(
                    model,
                    slots[i : i + largest],
                    tokens[i : i + largest],
                    positions[i : i + largest],
                )
                for i in range(0, n, largest)
            ]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()

    def _decode_batch(
        self,
        model: LlamaForCausalLM,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
    ) -> torch.Tensor:
        span = smallest_at_least(self.spans, max(positions) + 1)
        assert span is not None
        device = self._input_device
        ids = torch.tensor(tokens, dtype=torch.long).to(device)
        rows = torch.tensor(slots, dtype=torch.long).to(device)
        pos = torch.tensor(positions, dtype=torch.long).to(device)
        first = slots[0]
        consecutive = all(s == first + i for i, s in enumerate(slots))
        hidden = model.decode(ids, rows, pos, span, first if consecutive else None)  # [B, D]
        return model.logits(hidden).cpu()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if not self._check_copy(src, dst, length):
            return
        with self._lock, torch.inference_mode():
            self._live().copy_slot(src, dst, length)

    def close(self) -> None:
        with self._lock:
            model, self._model = self._model, None
        if model is None:
            return
        model.free_cache()
        devices = model.devices
        del model
        if any(d.type == "cuda" for d in devices):
            torch.cuda.empty_cache()
        logger.info("runner closed")


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Runs the block's CPU ops on the calling thread alone.

    Under OpenMP every thread that runs parallel torch ops keeps its own team of worker
    threads; once a process has more of them than cores (the loading thread's team plus the
    engine thread's), libgomp cuts how long idle workers spin before sleeping, and every
    parallel op then pays a wake-up: batch-1 decode took 45 ms instead of 30 ms. Loading is
    memory-bound and loses little on one thread, so only the engine thread keeps a team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_runner(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: str | torch.device = "cpu",
    num_slots: int | None = None,
) -> TorchRunner:
    """Builds the model from (canonical name, tensor) pairs on `device` (split over the mesh's
    GPUs on CUDA) and allocates the KV cache: `num_slots` slots (default: the largest batch
    size) of INPUT_SEQ_LEN + MAX_DECODE_STEPS positions.

    FAILED_PRECONDITION for weights that do not fit the config, or too few GPUs.
    """
    config.validate()
    slots = num_slots if num_slots is not None else max(config.batch_sizes)
    if slots <= 0:
        raise InvalidArgumentError(f"num_slots must be positive, got {slots}")
    devices = resolve_devices(config, device)
    with torch.no_grad(), _one_cpu_thread():
        model = build_model(config, tensors, devices)
        runner = TorchRunner(config, model, slots)
    logger.info(
        "runner ready: %d layers on %s, %d slots x %d positions, batch sizes %s, buckets %s",
        config.num_layers,
        ", ".join(str(d) for d in devices),
        slots,
        runner.max_seq_len,
        list(runner.batch_sizes),
        list(runner.buckets),
    )
    return runner
