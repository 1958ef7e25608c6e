"""Host sampling: greedy rules, seeded generators, top_k, top_p, repetition penalty, the
allowed-token mask, scores (numpy; no torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_server.backends.host_sampling import SamplerState, log_softmax, sample, verify
from model_server.engine.request import SampleOptions

V = 50


def logits(seed: int = 0, rows: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * 3).astype(np.float32)


def draw(x: np.ndarray, options: SampleOptions, n: int = 1, prompt: tuple[int, ...] = ()):
    state = SamplerState(options, V, prompt)
    return [sample(x, [state])[0][0] for _ in range(n)]


def test_temperature_zero_and_top_k_one_are_argmax() -> None:
    x = logits()
    best = int(np.argmax(x[0]))
    assert draw(x, SampleOptions(temperature=0.0), 5) == [best] * 5
    assert draw(x, SampleOptions(temperature=2.0, top_k=1, seed=3), 5) == [best] * 5
    assert SamplerState(SampleOptions(top_k=1, temperature=1.0), V, ()).generator is None


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    x = logits()
    a = draw(x, SampleOptions(temperature=1.0, seed=7), 30)
    assert a == draw(x, SampleOptions(temperature=1.0, seed=7), 30)
    assert a != draw(x, SampleOptions(temperature=1.0, seed=8), 30)


def test_rows_use_their_own_options() -> None:
    x = logits(rows=3)
    states = [
        SamplerState(SampleOptions(temperature=0.0), V, ()),
        SamplerState(SampleOptions(temperature=1.0, seed=1), V, ()),
        SamplerState(SampleOptions(temperature=1.0, top_k=1, seed=2), V, ()),
    ]
    tokens, _ = sample(x, states)
    assert tokens[0] == int(np.argmax(x[0])) and tokens[2] == int(np.argmax(x[2]))
    with pytest.raises(ValueError):
        sample(x, states[:2])


def test_top_k_keeps_the_k_likeliest() -> None:
    x = logits()
    allowed = set(np.argsort(-x[0])[:3].tolist())
    seen = set(draw(x, SampleOptions(temperature=5.0, top_k=3, seed=1), 200))
    assert seen == allowed


def test_top_p_keeps_the_nucleus() -> None:
    x = np.full((1, V), -20.0, dtype=np.float32)
    x[0, :4] = np.log([0.5, 0.3, 0.15, 0.05])
    seen = set(draw(x, SampleOptions(temperature=1.0, top_p=0.7, seed=1), 300))
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draw(x, SampleOptions(temperature=1.0, top_p=0.01, seed=1), 50)) == {0}
    # top_p applies to what top_k kept, renormalized: top_k 2 leaves 0.625 + 0.375.
    assert set(draw(x, SampleOptions(temperature=1.0, top_p=0.6, seed=2), 300)) == {0, 1}
    assert set(draw(x, SampleOptions(temperature=1.0, top_k=2, top_p=0.6, seed=2), 50)) == {0}


def test_repetition_penalty_pushes_away_from_seen_tokens() -> None:
    x = np.zeros((1, V), dtype=np.float32)
    x[0, 5], x[0, 6], x[0, 7] = 4.0, 3.0, -1.0
    assert draw(x, SampleOptions()) == [5]
    assert draw(x, SampleOptions(repetition_penalty=1.5), prompt=(5,)) == [6]  # 4 / 1.5 < 3
    state = SamplerState(SampleOptions(repetition_penalty=2.0), V, ())
    assert [sample(x, [state])[0][0] for _ in range(3)] == [5, 6, 5]  # 2.0 vs 1.5 vs 2.0
    # A negative logit is multiplied: seen token 7 gets less likely still.
    y = np.full((1, V), -5.0, dtype=np.float32)
    y[0, 7] = -1.0
    y[0, 8] = -1.5
    assert draw(y, SampleOptions(repetition_penalty=2.0), prompt=(7,)) == [8]


def test_scores_are_raw_log_softmax() -> None:
    x = logits(rows=2)
    states = [
        SamplerState(SampleOptions(temperature=0.3, seed=4), V, ()),
        SamplerState(SampleOptions(repetition_penalty=3.0), V, (1, 2, 3)),
    ]
    tokens, scores = sample(x, states)
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    expected = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    for i in range(2):
        assert scores[i] == pytest.approx(float(expected[i, tokens[i]]), abs=1e-6)
        assert scores[i] <= 0 and math.isfinite(scores[i])


def test_a_tiny_temperature_samples_like_greedy_without_nan() -> None:
    logits = np.array([[0.5, 3.0, -1.0, 2.9]], dtype=np.float32)
    state = SamplerState(SampleOptions(temperature=1e-38, seed=1), vocab_size=4, prompt=())
    tokens, logps = sample(logits, [state])
    assert tokens == [1] and math.isfinite(logps[0])


def test_allowed_tokens_restrict_the_choice_not_the_score() -> None:
    x = logits()
    allowed = np.zeros(V, dtype=bool)
    allowed[[3, 9]] = True
    state = SamplerState(SampleOptions(temperature=0.0), V, ())
    tokens, scores = sample(x, [state], allowed)
    assert tokens[0] == (3 if x[0, 3] >= x[0, 9] else 9)
    assert scores[0] == pytest.approx(float(log_softmax(x)[0, tokens[0]]), abs=1e-9)
    sampled = SamplerState(SampleOptions(temperature=5.0, seed=2), V, ())
    assert {sample(x, [sampled], allowed)[0][0] for _ in range(100)} == {3, 9}


def peaked(best: list[int]) -> np.ndarray:
    """Rows whose argmax is best[i]."""
    x = logits(seed=4, rows=len(best))
    x[np.arange(len(best)), best] += 20.0
    return x


def test_verify_greedy_keeps_the_agreeing_draft_and_adds_the_models_token() -> None:
    x = peaked([3, 9, 4, 7])
    greedy = SampleOptions()
    for draft, kept in (
        ((3, 9, 4), [3, 9, 4, 7]),  # all stand: the last row adds one
        ((3, 9, 1), [3, 9, 4]),  # the first disagreement is replaced and ends the run
        ((5, 9, 4), [3]),
    ):
        tokens, logp = verify(x, SamplerState(greedy, V, ()), draft)
        assert tokens == kept
        assert logp == pytest.approx(log_softmax(x)[np.arange(len(kept)), kept].tolist())
    with pytest.raises(ValueError):
        verify(x, SamplerState(greedy, V, ()), (3, 9))


def test_verify_greedy_applies_the_penalty_row_by_row() -> None:
    # Token 3 is best in both rows, 8 second; with a penalty 3 cannot repeat.
    x = np.full((2, V), -5.0, np.float32)
    x[:, 3], x[:, 8] = 4.0, 3.0
    state = SamplerState(SampleOptions(repetition_penalty=2.0), V, ())
    assert verify(x, state, (3,))[0] == [3, 8]
    assert state.seen is not None and state.seen[[3, 8]].all()


def test_verify_sampling_keeps_the_models_distribution() -> None:
    # One row over four tokens: whatever the draft, the first kept token follows p, and the
    # draft stands with probability p(draft).
    v = 4
    row = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25] * 4], np.float32))
    p = np.exp(row[0])
    n = 20_000
    for guess in (0, 3):
        first = np.zeros(v)
        stood = 0
        for seed in range(n):
            state = SamplerState(SampleOptions(temperature=1.0, seed=seed), v, ())
            tokens, _ = verify(row, state, (guess,))
            first[tokens[0]] += 1
            stood += tokens[0] == guess
            assert len(tokens) == (2 if tokens[0] == guess else 1)
        assert first / n == pytest.approx(p, abs=0.015)
        assert stood / n == pytest.approx(p[guess], abs=0.015)
