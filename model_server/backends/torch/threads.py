"""Intra-op threads for torch on a CPU that other work may share, chosen while serving.

With every core in one OpenMP team, each parallel op waits for its slowest thread; when a
neighbour takes one core (a build, another server), every op waits for the descheduled thread
and throughput falls to a fraction (measured on 2 cores beside one busy process: 98.6 -> 24.9
output tok/s at 16-way), while a team of half the cores keeps its cores and loses only what
the smaller team costs (74 tok/s). On an idle machine the whole team is faster. No fixed count
is right for both, so `ThreadTuner` measures: it serves with the best count it has seen and,
every `probe_every_s`, runs a few steps with each other count, switching when one is clearly
faster (each step compared with steps of its own size, so a change of load is not taken for a
change of speed).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def thread_choices(cores: int) -> tuple[int, ...]:
    """The counts worth trying on `cores` cores: all of them, and half."""
    return tuple(sorted({max(1, cores), max(1, cores // 2)}, reverse=True))


class ThreadTuner:
    """Sets torch's intra-op threads before each step (on the thread that runs the steps) and
    learns from each step's time which count is fastest.

    Steps are compared by size: each count keeps a running mean of its step time per size
    class (tokens rounded to a power of two), and a probe step is scored as its time over the
    best count's mean for steps of its size. A probe whose median score is below `switch_at`
    wins."""

    def __init__(
        self,
        choices: Sequence[int],
        *,
        window: int = 8,
        probe_every_s: float = 10.0,
        switch_at: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        if not choices or any(c < 1 for c in choices):
            raise ValueError(f"thread counts must be positive, got {list(choices)}")
        self.choices = tuple(choices)
        self.best = self.choices[0]
        self._window = window
        self._probe_every = probe_every_s
        self._switch_at = switch_at
        self._clock = clock
        self._set = set_threads
        self._current: int | None = None
        self._next_probe = clock() + probe_every_s
        self._mean: dict[tuple[int, int], float] = {}  # (count, size class) -> seconds
        self._probing: list[int] = []  # counts still to probe, the one running first
        self._probe_steps = 0
        self._ratios: list[float] = []
        self._scores: dict[int, float] = {}

    @property
    def threads(self) -> int:
        """The count the next step runs with."""
        return self._probing[0] if self._probing else self.best

    def before_step(self) -> None:
        """Sets the count for the coming step."""
        wanted = self.threads
        if wanted != self._current:
            self._set(wanted)
            self._current = wanted

    def after_step(self, seconds: float, tokens: int) -> None:
        """Records a step that ran `tokens` tokens in `seconds` (with the count
        `before_step` set)."""
        if tokens <= 0 or len(self.choices) == 1:
            return
        size = max(tokens, 1).bit_length()
        ran = self.threads
        if self._probing:
            baseline = self._mean.get((self.best, size))
            if baseline:
                self._ratios.append(seconds / baseline)
        old = self._mean.get((ran, size))
        self._mean[(ran, size)] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if not self._probing:
            self._probe_steps += 1  # steps at the best count since the last decision
            if self._probe_steps >= self._window and self._clock() >= self._next_probe:
                self._probing = [c for c in self.choices if c != self.best]
                self._probe_steps, self._ratios, self._scores = 0, [], {}
            return
        self._probe_steps += 1
        if self._probe_steps < self._window:
            return
        count = self._probing.pop(0)
        if len(self._ratios) >= self._window // 2:
            self._scores[count] = statistics.median(self._ratios)
        self._probe_steps, self._ratios = 0, []
        if not self._probing:
            self._decide()

    def _decide(self) -> None:
        self._next_probe = self._clock() + self._probe_every
        self._probe_steps = 0
        if not self._scores:
            return
        count = min(self._scores, key=self._scores.__getitem__)
        if self._scores[count] < self._switch_at:
            logger.info(
                "intra-op threads %d -> %d (its steps took %.2fx the time)",
                self.best,
                count,
                self._scores[count],
            )
            self.best = count
