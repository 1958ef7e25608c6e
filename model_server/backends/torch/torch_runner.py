"""The torch runner: the engine's `Runner` over a PyTorch Llama on CPU or CUDA.

It owns a Llama model and its static KV cache of `num_slots` slots of `max_seq_len` positions
(the config's INPUT_SEQ_LEN + MAX_DECODE_STEPS). An engine step runs in one pass through the
model (`step_logits`): every prompt chunk the scheduler handed out (several prompts, or later
pieces of long ones: the runner prefills in chunks) and every decode row share each layer's
matrix products. Prompts and decode batches run at their exact size (eager torch gains nothing
from padding); the attended length of decode rows is rounded up to a multiple of SPAN_STEP (or
the slot length), in groups of at most the largest BATCH_SIZE; when a group's slots are
consecutive (the usual case: the lowest free slot goes first) the cache is attended in place
instead of gathered.

Every method runs under `torch.inference_mode`; logits come back as float32 numpy arrays and
are sampled on the host (`model_server.backends.logits_runner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from model_server.backends.logits_runner import LogitsRunner, RunnerChecks, smallest_at_least
from model_server.backends.torch.weights import build_model, resolve_dtype
from model_server.engine.scheduler import SchedulerOutput
from model_server.models.llama_torch import Chunk, DecodeRows, LlamaForCausalLM, Part
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

    def _live(self) -> LlamaForCausalLM:
        if self._model is None:
            raise FailedPreconditionError("the runner was closed; load the model again")
        return self._model

    chunked_prefill = True

    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True, start: int = 0
    ) -> np.ndarray:
        n = len(tokens)
        self._check_prefill(slot, tokens, start)
        with self._lock, torch.inference_mode():
            model = self._live()
            ids = torch.tensor(list(tokens), dtype=torch.long)
            hidden = model.step(ids, [Chunk(slot, start, n)])  # [T, D]
            hidden = hidden if all_logits else hidden[n - 1 : n]
            return model.logits(hidden).cpu().numpy()

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        self._check_decode(slots, tokens, positions)
        with self._lock, torch.inference_mode():
            model = self._live()
            ids = torch.tensor(list(tokens), dtype=torch.long)
            hidden = model.step(ids, self._decode_parts(slots, positions))  # [B, D]
            return model.logits(hidden).cpu().numpy()

    def _decode_parts(self, slots: Sequence[int], positions: Sequence[int]) -> list[DecodeRows]:
        """Decode rows in groups of at most the largest batch size, each attending to a span
        rounded up to SPAN_STEP, in place when its slots are consecutive."""
        largest = self.batch_sizes[-1]
        parts = []
        for i in range(0, len(slots), largest):
            group, pos = tuple(slots[i : i + largest]), tuple(positions[i : i + largest])
            span = smallest_at_least(self.spans, max(pos) + 1)
            assert span is not None
            first = group[0]
            consecutive = all(s == first + j for j, s in enumerate(group))
            parts.append(DecodeRows(group, pos, span, first if consecutive else None))
        return parts

    def step_logits(self, work: SchedulerOutput) -> np.ndarray:
        """Every prompt chunk and decode row of the step in one pass through the model."""
        tokens: list[int] = []
        parts: list[Part] = []
        wanted: list[int] = []  # rows of the pass whose logits are sampled, in output order
        copies: list[tuple[int, int, int]] = []  # (src, dst, length) after the pass
        for p in work.prefills:
            chunk = p.chunk
            self._check_prefill(p.slots[0], chunk, p.start)
            parts.append(Chunk(p.slots[0], p.start, len(chunk)))
            tokens += chunk
            if p.final:
                wanted += [len(tokens) - 1] * len(p.slots)
                copies += [(p.slots[0], s, len(p.tokens)) for s in p.slots[1:]]
        for copy in copies:
            self._check_copy(*copy)
        for batch in work.decodes:
            self._check_decode(batch.slots, batch.tokens, batch.positions)
            wanted += range(len(tokens), len(tokens) + len(batch.tokens))
            parts += self._decode_parts(batch.slots, batch.positions)
            tokens += batch.tokens
        if not parts:
            return np.zeros((0, self.vocab_size), np.float32)
        with self._lock, torch.inference_mode():
            model = self._live()
            hidden = model.step(torch.tensor(tokens, dtype=torch.long), parts)  # [N, D]
            for copy in copies:
                model.copy_slot(*copy)
            if not wanted:
                return np.zeros((0, self.vocab_size), np.float32)
            rows = torch.tensor(wanted, device=hidden.device)
            return model.logits(hidden.index_select(0, rows)).cpu().numpy()

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
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, devices[0]))
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
