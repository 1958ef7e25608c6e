"""Draft tokens by prompt lookup (n-gram speculation), in pure Python.

A sample that speculates guesses its next tokens by finding the last few tokens of its
sequence (prompt and generated so far) earlier in that sequence and proposing what followed
them there: text that quotes or edits its prompt (summaries, code changes, extraction, chat
that repeats names) continues the way the earlier occurrence did. The model then checks every
guess in one pass (`scheduler.VerifyWork`) and keeps the longest agreeing run plus one token of
its own, so a step yields 1 to 1 + k tokens for about the cost of one.

The longest n-gram first (from `MAX_NGRAM` down to `MIN_NGRAM` tokens), and among its
occurrences the most recent. An index of every n-gram to the position after its last
occurrence makes each lookup and each appended token O(MAX_NGRAM).
"""

from __future__ import annotations

from collections.abc import Iterable

# The n-gram sizes looked up, longest first. One-token matches guess too often to pay for
# their verification on a memory-bound CPU step.
MAX_NGRAM = 4
MIN_NGRAM = 2


class PromptLookup:
    """The n-gram index of one growing sequence."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._seq: list[int] = []
        # n-gram -> the position right after its most recent occurrence that is not the
        # sequence's own tail (the tail is what a lookup searches for).
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._seq)

    def extend(self, tokens: Iterable[int]) -> None:
        """Appends tokens to the sequence."""
        seq, index = self._seq, self._next
        for token in tokens:
            # The n-grams ending at the old last token now have a continuation: `token`.
            end = len(seq)
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    index[tuple(seq[end - n : end])] = end
            seq.append(token)

    def propose(self, k: int) -> tuple[int, ...]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's
        longest matching tail; () when no tail of MIN_NGRAM tokens or more occurred before."""
        seq = self._seq
        if k <= 0:
            return ()
        for n in range(min(MAX_NGRAM, len(seq) - 1), MIN_NGRAM - 1, -1):
            start = self._next.get(tuple(seq[-n:]))
            if start is not None:
                return tuple(seq[start : start + k])
        return ()
