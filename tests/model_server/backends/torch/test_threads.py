"""ThreadTuner: serves with the fastest thread count measured, probes the others now and then,
and ignores probes whose steps differ in size from the steps they are compared with."""

from __future__ import annotations

import itertools

import pytest

from model_server.backends.torch.threads import ThreadTuner, thread_choices


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(
    tuner: ThreadTuner, clock: Clock, per_token: dict[int, float], steps: int, tokens: int = 16
) -> list[int]:
    """Runs steps whose time per token depends on the thread count; returns the counts used."""
    used = []
    for _ in range(steps):
        tuner.before_step()
        used.append(tuner.threads)
        seconds = per_token[tuner.threads] * tokens
        clock.now += seconds
        tuner.after_step(seconds, tokens)
    return used


def test_choices() -> None:
    assert thread_choices(2) == (2, 1)
    assert thread_choices(16) == (16, 8)
    assert thread_choices(1) == (1,)


def test_switches_to_the_faster_count_and_back() -> None:
    clock, calls = Clock(), []
    tuner = ThreadTuner((2, 1), window=4, probe_every_s=1.0, clock=clock, set_threads=calls.append)
    # Quiet machine: 2 threads are faster; the probe of 1 thread does not win.
    drive(tuner, clock, {2: 0.01, 1: 0.02}, 40)
    assert tuner.best == 2 and 1 in calls
    # A neighbour takes a core: 2 threads become slow; the next probe moves to 1.
    drive(tuner, clock, {2: 0.05, 1: 0.02}, 40)
    assert tuner.best == 1
    # The neighbour leaves: a later probe of 2 threads wins again.
    drive(tuner, clock, {2: 0.01, 1: 0.02}, 200)
    assert tuner.best == 2
    assert all(a != b for a, b in itertools.pairwise(calls))  # set only on a change


def test_steps_are_compared_with_steps_of_their_own_size() -> None:
    clock = Clock()
    tuner = ThreadTuner(
        (2, 1), window=2, probe_every_s=0.0, clock=clock, set_threads=lambda n: None
    )
    # At 2 threads: 16-token steps take 0.2 s, 1-token steps 0.02 s.
    for tokens, seconds in ((16, 0.2), (1, 0.02)):
        tuner.after_step(seconds, tokens)
    assert tuner.threads == 1  # probing
    # The probe runs single-token steps: far shorter than the 16-token ones, but no faster
    # than 2 threads' single-token steps, so 2 threads stay.
    tuner.after_step(0.021, 1)
    tuner.after_step(0.021, 1)
    assert tuner.best == 2 and tuner.threads == 2
    # Probe steps of a size 2 threads never ran tell nothing: no switch either.
    tuner.after_step(0.2, 16)
    tuner.after_step(0.2, 16)
    assert tuner.threads == 1
    tuner.after_step(0.001, 64)
    tuner.after_step(0.001, 64)
    assert tuner.best == 2


def test_one_choice_never_probes() -> None:
    clock, calls = Clock(), []
    tuner = ThreadTuner((3,), window=2, probe_every_s=0.0, clock=clock, set_threads=calls.append)
    drive(tuner, clock, {3: 0.01}, 10)
    assert calls == [3] and tuner.best == 3
    with pytest.raises(ValueError):
        ThreadTuner((0,))
