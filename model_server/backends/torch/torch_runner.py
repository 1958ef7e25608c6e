"""The torch runner: the engine's `Runner` over a PyTorch decoder (Llama, BLOOM) on CPU or CUDA.

It owns the model and its paged KV cache: blocks of KV_BLOCK_SIZE positions, as many as
KV_CACHE_TOKENS holds (default: every one of `num_slots` sequences at its full length,
INPUT_SEQ_LEN + MAX_DECODE_STEPS). The engine's scheduler hands out the blocks; each sequence
in a step comes with its block table. An engine step runs in one pass through the model
(`step_logits`): every prompt chunk the scheduler handed out (several prompts, or later pieces
of long ones: the runner prefills in chunks) and every decode row share each layer's matrix
products. Prompts and decode batches run at their exact size (eager torch gains nothing from
padding); decode rows attend to their blocks up to the group's longest sequence rounded up to
SPAN_STEP, in groups of at most the largest BATCH_SIZE. A speculating sample's draft runs as a
chunk at its position, every position's logits kept.

The slot calls of `LogitsRunner` (`prefill_logits`, `decode_logits`, `copy_slot`) see slot s as
the fixed block table s * per_slot, ..., (s + 1) * per_slot - 1 (per_slot blocks hold a
sequence), so they need a cache that holds every slot at full length.

Every method runs under `torch.inference_mode`; logits come back as float32 numpy arrays and
are sampled on the host (`model_server.backends.logits_runner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from model_server.backends.logits_runner import LogitsRunner, RunnerChecks, smallest_at_least
from model_server.backends.torch import small_gemm
from model_server.backends.torch.threads import ThreadTuner, thread_choices
from model_server.backends.torch.weights import build_model, resolve_dtype
from model_server.engine.kv_cache import blocks_for
from model_server.engine.scheduler import BlockCopy, SchedulerOutput
from model_server.models.paged_torch import Chunk, DecodeRows, PagedDecoder, Part
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.decoder_config import DecoderConfig

logger = logging.getLogger(__name__)

# Attended lengths of decode steps are multiples of this (or the slot length): attention reads
# at most this many positions more than the batch's longest sequence.
SPAN_STEP = 32


def resolve_devices(config: DecoderConfig, device: str | torch.device) -> list[torch.device]:
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
    """The engine's `Runner` over a torch decoder of any family (`PagedDecoder`; sampling on
    the host). Calls are
    serialized by a lock."""

    def __init__(
        self,
        config: DecoderConfig,
        model: PagedDecoder,
        num_slots: int,
        cpu_threads: int | None = None,
    ) -> None:
        """cpu_threads: the most intra-op threads a step may use on a CPU (default: torch's
        count now); CPU_THREADS fixes the count instead."""
        super().__init__()
        self.config = config
        self._set_shapes(config, num_slots)
        self.spans = (*range(SPAN_STEP, self.max_seq_len, SPAN_STEP), self.max_seq_len)
        self._block_size = config.kv_block_size
        self._per_slot = blocks_for(self.max_seq_len, self._block_size)
        tokens = config.kv_cache_tokens or num_slots * self._per_slot * self._block_size
        self._num_blocks = blocks_for(tokens, self._block_size)
        self._model: PagedDecoder | None = model
        self._lock = threading.Lock()
        self._tuner: ThreadTuner | None = None
        if model.devices[0].type == "cpu":
            if config.cpu_threads:
                self._tuner = ThreadTuner((config.cpu_threads,))
            else:
                cores = cpu_threads or torch.get_num_threads()
                self._tuner = ThreadTuner(thread_choices(cores))
        # Float32 products of few rows through small_gemm: measured at the first step, on the
        # thread and the thread count that run the steps.
        self._choose_gemm = (
            model.devices[0].type == "cpu"
            and config.dtype == "float32"
            and config.cpu_gemm == "auto"
        )
        with torch.inference_mode():
            model.allocate_cache(self._num_blocks, self._block_size, self.max_seq_len)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def _slot_table(self, slot: int) -> tuple[int, ...]:
        """The fixed block table of a slot (the slot calls)."""
        self._check_slot(slot)
        first = slot * self._per_slot
        if first + self._per_slot > self._num_blocks:
            raise FailedPreconditionError(
                f"the KV cache of {self._num_blocks} blocks does not hold slot {slot} at full "
                "length; slot calls need KV_CACHE_TOKENS of at least every slot's length"
            )
        return tuple(range(first, first + self._per_slot))

    def _check_table(self, blocks: Sequence[int], end: int) -> None:
        """A block table that holds positions [0, end)."""
        bad = [b for b in blocks if not 0 <= b < self._num_blocks]
        if bad:
            raise InvalidArgumentError(
                f"KV cache blocks {bad[:5]} are outside [0, {self._num_blocks})"
            )
        if len(blocks) * self._block_size < end:
            raise InvalidArgumentError(
                f"a table of {len(blocks)} blocks holds {len(blocks) * self._block_size} "
                f"positions, not {end}"
            )

    def _live(self) -> PagedDecoder:
        """The model (under the lock), its kernels chosen on the first call."""
        if self._model is None:
            raise FailedPreconditionError("the runner was closed; load the model again")
        if self._choose_gemm:
            self._choose_gemm = False
            gemm = small_gemm.load()
            if gemm is not None:
                small_gemm.install(self._model, gemm)
        return self._model

    chunked_prefill = True

    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True, start: int = 0
    ) -> np.ndarray:
        return self.prefill_blocks(  # checks the tokens; the slot's table checks the slot
            self._slot_table(slot), tokens, all_logits=all_logits, start=start
        )

    def prefill_blocks(
        self, blocks: Sequence[int], tokens: Sequence[int], *, all_logits: bool, start: int = 0
    ) -> np.ndarray:
        n = len(tokens)
        self._check_prefill(None, tokens, start)
        self._check_table(blocks, start + n)
        with self._lock, torch.inference_mode():
            model = self._live()
            ids = torch.tensor(list(tokens), dtype=torch.long)
            hidden = model.step(ids, [Chunk(tuple(blocks), start, n)])  # [T, D]
            hidden = hidden if all_logits else hidden[n - 1 : n]
            return model.logits(hidden).cpu().numpy()

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        self._check_decode(slots, tokens, positions)
        tables = [self._slot_table(s) for s in slots]
        with self._lock, torch.inference_mode():
            model = self._live()
            ids = torch.tensor(list(tokens), dtype=torch.long)
            hidden = model.step(ids, self._decode_parts(tables, positions))  # [B, D]
            return model.logits(hidden).cpu().numpy()

    def _decode_parts(
        self, tables: Sequence[Sequence[int]], positions: Sequence[int]
    ) -> list[DecodeRows]:
        """Decode rows in groups of at most the largest batch size, each attending to a span
        rounded up to SPAN_STEP."""
        largest = self.batch_sizes[-1]
        parts = []
        for i in range(0, len(tables), largest):
            group = tuple(tuple(t) for t in tables[i : i + largest])
            pos = tuple(positions[i : i + largest])
            for table, p in zip(group, pos, strict=True):
                self._check_table(table, p + 1)
            span = smallest_at_least(self.spans, max(pos) + 1)
            assert span is not None
            parts.append(DecodeRows(group, pos, span, *self._evenly_spaced(group, span)))
        return parts

    def _evenly_spaced(self, tables: Sequence[Sequence[int]], span: int) -> tuple[int | None, int]:
        """(first, stride) when each table's blocks follow each other and the tables start
        `stride` blocks apart (the cache is then attended in place); (None, 0) otherwise."""
        first = tables[0][0]
        stride = tables[1][0] - first if len(tables) > 1 else 0
        needed = blocks_for(span, self._block_size)
        if len(tables) > 1 and stride <= 0:
            return None, 0
        # A row's view may run into the next row's blocks: those positions are masked.
        for b, table in enumerate(tables):
            start = first + b * stride
            if any(block != start + j for j, block in enumerate(table[:needed])):
                return None, 0
        if first + (len(tables) - 1) * stride + needed > self._num_blocks:
            return None, 0  # the view would pass the end of the cache
        return first, stride

    def step_logits(self, work: SchedulerOutput) -> np.ndarray:
        """Every prompt chunk and decode row of the step in one pass through the model."""
        tokens: list[int] = []
        parts: list[Part] = []
        wanted: list[int] = []  # rows of the pass whose logits are sampled, in output order
        copies: list[BlockCopy] = []  # after the pass
        for p in work.prefills:
            chunk = p.chunk
            self._check_prefill(None, chunk, p.start)
            self._check_table(p.blocks, p.end)
            parts.append(Chunk(p.blocks, p.start, len(chunk)))
            tokens += chunk
            wanted += [len(tokens) - 1] * len(p.sampled_keys)
            copies += p.copies
        for c in copies:
            self._check_table((c.src, c.dst), 0)
            if not 0 <= c.length <= self._block_size:
                raise InvalidArgumentError(f"copy length {c.length} passes a block")
        for batch in work.decodes:
            self._check_decode(batch.slots, batch.tokens, batch.positions, check_slots=False)
            wanted += range(len(tokens), len(tokens) + len(batch.tokens))
            parts += self._decode_parts(batch.blocks, batch.positions)
            tokens += batch.tokens
        for v in work.verifies:  # like a prompt chunk, every position sampled
            self._check_prefill(None, v.tokens, v.position)
            self._check_table(v.blocks, v.end)
            parts.append(Chunk(v.blocks, v.position, len(v.tokens)))
            wanted += range(len(tokens), len(tokens) + len(v.tokens))
            tokens += v.tokens
        if not parts:
            return np.zeros((0, self.vocab_size), np.float32)
        with self._lock, torch.inference_mode():
            if self._tuner is not None:
                self._tuner.before_step()  # the engine thread runs every step
            model = self._live()
            began = time.perf_counter()
            hidden = model.step(torch.tensor(tokens, dtype=torch.long), parts)  # [N, D]
            for c in copies:
                model.copy_block(c.src, c.dst, c.length)
            logits = np.zeros((0, self.vocab_size), np.float32)
            if wanted:
                rows = torch.tensor(wanted, device=hidden.device)
                logits = model.logits(hidden.index_select(0, rows)).cpu().numpy()
            if self._tuner is not None:
                self._tuner.after_step(time.perf_counter() - began, len(tokens))
            return logits

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if not self._check_copy(src, dst, length):
            return
        src_table, dst_table = self._slot_table(src), self._slot_table(dst)
        with self._lock, torch.inference_mode():
            model = self._live()
            for i in range(blocks_for(length, self._block_size)):
                n = min(self._block_size, length - i * self._block_size)
                model.copy_block(src_table[i], dst_table[i], n)

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
    config: DecoderConfig,
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
    threads = torch.get_num_threads()
    with torch.no_grad(), _one_cpu_thread():
        model = build_model(config, tensors, devices)
        runner = TorchRunner(config, model, slots, cpu_threads=threads)
    logger.info(
        "runner ready: %d layers on %s, %d slots x %d positions, batch sizes %s, buckets %s",
        model.config.num_layers,
        ", ".join(str(d) for d in devices),
        slots,
        runner.max_seq_len,
        list(runner.batch_sizes),
        list(runner.buckets),
    )
    return runner
