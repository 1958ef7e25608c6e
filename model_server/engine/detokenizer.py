"""Incremental detokenization of one sample, with stop strings.

Each new token's text is the difference between decoding a short window of recent tokens with
and without it; while that text ends in U+FFFD (an incomplete UTF-8 character, e.g. the first
byte token of "é") it is held until the next token completes it. A few prompt tokens seed the
window so that tokenizers which drop a word's leading space at the start of a text (SentencePiece)
decode the first generated word right.

With stop strings, text that could be the start of a stop string is held back too; once a stop
string appears the text ends right before it and the sample is done. Held text is never taken
back, so the stream's prefix_len is always the length emitted so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Prompt tokens that seed the decode window.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def _held_len(text: str, start: int, stops: Sequence[str]) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - start), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class Detokenizer:
    """Turns one sample's generated tokens into text, a piece at a time."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        prompt: Sequence[int] = (),
        stop: Sequence[str] = (),
    ) -> None:
        self._decode = decode
        self._ids = list(prompt[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this are in _text
        self._text = ""  # decoded so far (emitted + held)
        self._emitted = 0
        self._stops = tuple(s for s in stop if s)
        self.stopped = False

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return self._text[: self._emitted]

    def add(self, token: int) -> str:
        """Adds a generated token; returns the text that is now safe to emit (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The held text at the end of the sample (an incomplete character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _advance(self, final: bool) -> None:
        if self._read == len(self._ids):
            return
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith(_REPLACEMENT)):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self._stops:
            hits = [i for s in self._stops if (i := self._text.find(s, self._emitted)) >= 0]
            if hits:
                end = min(hits)
                self._text = self._text[:end]
                self.stopped = True
            elif not final:
                end -= _held_len(self._text, self._emitted, self._stops)
        piece = self._text[self._emitted : end]
        self._emitted = end
        return piece
