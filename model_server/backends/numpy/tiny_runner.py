"""The numpy runner of TinyLM: its "KV cache" is each slot's tokens, since the model reads the
last `CONTEXT` tokens before a position (`model_server.models.tiny_numpy`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from model_server.backends.logits_runner import LogitsRunner, RunnerChecks
from model_server.models import tiny_numpy
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.configs.test import TinyLM

logger = logging.getLogger(__name__)


class TinyRunner(RunnerChecks, LogitsRunner):
    """TinyLM over `num_slots` token slots of INPUT_SEQ_LEN + MAX_DECODE_STEPS positions."""

    allowed_tokens = tiny_numpy.ALLOWED

    def __init__(self, config: TinyLM, num_slots: int | None = None) -> None:
        super().__init__()
        self.num_slots = num_slots if num_slots is not None else max(config.batch_sizes)
        self.max_seq_len = config.input_seq_len + config.max_decode_steps
        self.vocab_size = tiny_numpy.VOCAB_SIZE
        self.buckets = (self.max_seq_len,)
        self._weights: tiny_numpy.Weights | None = tiny_numpy.Weights.random(config)
        logger.debug("TinyLM weights: %d bytes", self._weights.nbytes())
        self._slots: list[list[int]] = [[] for _ in range(self.num_slots)]

    def _w(self) -> tiny_numpy.Weights:
        if self._weights is None:
            raise FailedPreconditionError("the model was unloaded; load it again to use it")
        return self._weights

    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True, start: int = 0
    ) -> np.ndarray:
        self._check_prefill(slot, tokens, start)
        self._slots[slot] = list(tokens)
        n = len(tokens)
        positions = range(1, n + 1) if all_logits else [n]
        return tiny_numpy.forward(self._w(), tiny_numpy.contexts(tokens, positions))  # [P, V]

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        self._check_decode(slots, tokens, positions)
        rows = []
        for slot, token, pos in zip(slots, tokens, positions, strict=True):
            history = self._slots[slot]
            if not 0 < pos <= len(history):
                raise InvalidArgumentError(f"decode position {pos} is outside slot {slot}")
            del history[pos:]
            history.append(token)
            rows.append(tiny_numpy.contexts(history, [pos + 1]))
        return tiny_numpy.forward(self._w(), np.concatenate(rows))  # [B, V]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self._check_slot(src)
        self._check_slot(dst)
        self._slots[dst] = self._slots[src][:length]

    def close(self) -> None:
        self._weights = None
        self._slots = [[] for _ in range(self.num_slots)]
