"""Builders for engine tests: a byte-level tokenizer folder, a deterministic fake runner with a
real per-slot token cache, and a small config.

Token ids 0..255 are the UTF-8 bytes of the text; 256.. are special tokens. The fake runner's
logits at a position depend on every token of its slot up to that position (a rolling hash), so
a slot, position or copy mix-up changes the output; `reference_greedy` replays the same rule on a
plain list to give the expected continuation. With `order` n the logits depend on the last n
tokens only (an n-gram model: greedy text falls into loops, which prompt lookup predicts).
"""

from __future__ import annotations

import json
import pathlib
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from model_server.backends.logits_runner import LogitsRunner
from model_server.engine.engine_servable import EngineServable
from model_server.engine.tokenizer import Tokenizer
from sax.v1 import common_pb2
from servables.sampling_params import SamplingParams
from servables.servable_config import ServableConfig

BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
SPECIALS = {"<s>": BOS, "</s>": EOS, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
VOCAB_SIZE = 260
PRINTABLE = list(range(32, 127))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def write_tokenizer(folder: pathlib.Path, config: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes tokenizer.json (byte-level, id = byte) and tokenizer_config.json into folder."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    if config is not None:
        cfg = {**cfg, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def _mix(h: int, token: int) -> int:
    return (h * 1_000_003 + token + 1) % (2**61 - 1)


def context_hashes(tokens: Sequence[int]) -> list[int]:
    """hashes[i]: the hash of tokens[: i + 1]."""
    out, h = [], 17
    for t in tokens:
        h = _mix(h, t)
        out.append(h)
    return out


def logits_after(h: int, eos_period: int = 0) -> np.ndarray:
    """The fake model's next-token logits after a context with hash h: [V] float32.

    Printable ASCII only (others are far below), one preferred token 6 units above the rest,
    EOS preferred when eos_period divides the hash.
    """
    x = np.random.default_rng(h).standard_normal(VOCAB_SIZE).astype(np.float32) - 30.0
    x[PRINTABLE] += 30.0
    x[EOS] += 29.0
    x[PRINTABLE[h % len(PRINTABLE)]] += 6.0
    if eos_period and h % eos_period == 0:
        x[EOS] += 12.0
    return x


def window_hash(tokens: Sequence[int], order: int) -> int:
    """The hash the fake model's next logits follow: of every token, or of the last `order`."""
    return context_hashes(tokens[-order:] if order else tokens)[-1]


def reference_greedy(
    prompt: Sequence[int], steps: int, eos_period: int = 0, order: int = 0
) -> list[int]:
    """The greedy continuation (EOS included if produced) computed without a cache."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        nxt = int(np.argmax(logits_after(window_hash(tokens, order), eos_period)))
        out.append(nxt)
        if nxt == EOS:
            break
        tokens.append(nxt)
    return out


class FakeRunner(LogitsRunner):
    """A `Runner` whose "KV cache" holds each slot's context hashes (sampling: the host's).

    `gate`: when set, each decode call first takes a permit (the test steps the engine).
    `fail_decodes`: that many next decode calls raise RuntimeError.
    """

    def __init__(
        self,
        num_slots: int = 8,
        max_seq_len: int = 56,
        *,
        eos_period: int = 0,
        gate: threading.Semaphore | None = None,
        order: int = 0,
    ) -> None:
        super().__init__()
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.vocab_size = VOCAB_SIZE
        self.eos_period = eos_period
        self.order = order
        self.gate = gate
        self.fail_decodes = 0
        self.closed = False
        self.log: list[tuple[Any, ...]] = []
        self._hashes: list[list[int | None]] = [[None] * max_seq_len for _ in range(num_slots)]
        self._tokens: list[list[int]] = [[-1] * max_seq_len for _ in range(num_slots)]

    def _logits(self, slot: int, pos: int) -> np.ndarray:
        """The logits after position `pos` of a slot."""
        h = self._hashes[slot][pos]
        assert h is not None
        if self.order:
            window = self._tokens[slot][max(0, pos - self.order + 1) : pos + 1]
            h = window_hash(window, self.order)
        return logits_after(h, self.eos_period)

    chunked_prefill = True

    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True, start: int = 0
    ) -> np.ndarray:
        end = start + len(tokens)
        assert len(tokens) > 0 and end <= self.max_seq_len and 0 <= slot < self.num_slots
        self.log.append(("prefill", slot, tuple(tokens)) if not start else ("chunk", slot, start))
        row = self._hashes[slot]
        if start:
            before = row[start - 1]
            assert before is not None, f"slot {slot} has nothing at position {start - 1}"
            hashes = []
            for t in tokens:
                before = _mix(before, t)
                hashes.append(before)
        else:
            hashes = context_hashes(tokens)
        row[start:end] = hashes
        row[end:] = [None] * (self.max_seq_len - end)
        self._tokens[slot][start:end] = tokens
        wanted = range(start, end) if all_logits else [end - 1]
        return np.stack([self._logits(slot, p) for p in wanted])

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        if self.gate is not None and not self.gate.acquire(timeout=20):
            raise RuntimeError("the test did not release the decode gate")
        if self.fail_decodes:
            self.fail_decodes -= 1
            raise RuntimeError("injected decode failure")
        assert len(set(slots)) == len(slots) == len(tokens) == len(positions)
        self.log.append(("decode", tuple(slots)))
        rows = []
        for slot, token, pos in zip(slots, tokens, positions, strict=True):
            before = self._hashes[slot][pos - 1]
            assert before is not None, f"slot {slot} has nothing at position {pos - 1}"
            self._hashes[slot][pos] = _mix(before, token)
            self._tokens[slot][pos] = token
            rows.append(self._logits(slot, pos))
        return np.stack(rows)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.log.append(("copy", src, dst, length))
        self._hashes[dst][:length] = self._hashes[src][:length]
        self._tokens[dst][:length] = self._tokens[src][:length]

    def close(self) -> None:
        self.closed = True


def _extra_inputs() -> Mapping[str, Any]:
    return types.MappingProxyType(
        {
            "temperature": 0.0,
            "top_k": 0.0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "per_example_max_decode_steps": 24.0,
            "seed": 0.0,
            "stop": "",
            "speculative_tokens": 0.0,
        }
    )


@dataclass(frozen=True)
class FakeLMConfig(ServableConfig):
    """A small engine config: prompts up to 32 tokens, 24 decode steps (slot length 56)."""

    truncate_prompt: bool = False
    max_queue: int = 16
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    bucket_keys: tuple[int, ...] = (16, 32)
    input_seq_len: int = 32
    max_decode_steps: int = 24
    num_samples: int = 1
    extra_inputs: Mapping[str, Any] = field(default_factory=_extra_inputs)


def params(config: ServableConfig, **items: float | str) -> SamplingParams:
    """SamplingParams from extra inputs (strings go to the strings map)."""
    numbers = {k: float(v) for k, v in items.items() if not isinstance(v, str)}
    strings = {k: v for k, v in items.items() if isinstance(v, str)}
    extra = common_pb2.ExtraInputs(items=numbers, strings=strings)
    return SamplingParams.from_extra_inputs(extra, config)


def build_servable(
    tmp_path: pathlib.Path, config: FakeLMConfig | None = None, **runner_kwargs: Any
) -> tuple[EngineServable, FakeRunner, Tokenizer]:
    """An EngineServable over a FakeRunner and the byte-level tokenizer."""
    config = config or FakeLMConfig()
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path / "tokenizer"))
    runner_kwargs.setdefault("max_seq_len", config.input_seq_len + config.max_decode_steps)
    runner = FakeRunner(**runner_kwargs)
    return EngineServable(config, runner, tokenizer), runner, tokenizer
