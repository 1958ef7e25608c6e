"""Token sampling on the host (numpy), shared by every backend: one sample's options, random
generator and seen tokens, and a batch of rows sampled with them.

Per row, in order: the backend's allowed-token mask (TinyLM's printable bytes), the repetition
penalty (CTRL style: a seen token's logit is divided by the penalty when positive, multiplied
when negative), then argmax when the temperature is 0 or top_k is 1; otherwise temperature,
top_k, top_p (on what top_k kept) and one uniform draw from the sample's seeded
`numpy.random.Generator` through the cumulative distribution. A token's score is the
log-softmax of the raw logits (temperature 1, no penalty, no mask) at the chosen token, so a
sample's score is log p(text | prompt). The same seed gives the same tokens on every backend
for the same logits. `verify` decides which tokens of a speculating sample's draft stand, with
the same choices row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_server.engine.request import SampleOptions


class SamplerState:
    """One sample's random generator and the tokens it has seen (for the repetition penalty)."""

    def __init__(self, options: SampleOptions, vocab_size: int, prompt: Sequence[int]) -> None:
        self.options = options
        self.generator: np.random.Generator | None = None
        if not options.greedy:
            self.generator = np.random.default_rng(options.seed)
        self.seen: np.ndarray | None = None  # [V] bool
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            if prompt:
                self.seen[np.asarray(prompt, dtype=np.int64)] = True

    def observe(self, token: int) -> None:
        """Records a generated token."""
        if self.seen is not None:
            self.seen[token] = True


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, computed in float64: [..., V] -> [..., V]."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _penalize(row: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL repetition penalty on the seen tokens of one row of logits: [V] -> [V]."""
    penalized = np.where(row > 0, row / penalty, row * penalty)
    return np.where(seen, penalized, row)


def _filter(row: np.ndarray, options: SampleOptions) -> np.ndarray:
    """Probabilities of one row after temperature, top_k and top_p: [V] logits -> [V] probs."""
    # Shifted so the largest logit is 0 first: a tiny temperature then gives -inf and 0, never
    # inf - inf = NaN.
    row = (row.astype(np.float64) - row.max()) / options.temperature
    if 0 < options.top_k < row.size:
        kth = np.partition(row, row.size - options.top_k)[row.size - options.top_k]
        row = np.where(row < kth, -np.inf, row)
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs  # mass of likelier tokens
        probs = probs.copy()
        probs[order[before >= options.top_p]] = 0.0  # the first token is always kept
    return probs


def _draw(probs: np.ndarray, generator: np.random.Generator) -> int:
    """One token from `probs` [V] with one uniform draw (tokens of probability 0 never)."""
    cdf = np.cumsum(probs)
    u = generator.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), probs.size - 1)


def _pick(row: np.ndarray, state: SamplerState, allowed: np.ndarray | None) -> np.ndarray | int:
    """One row's choice: the token (greedy) or the probabilities to draw from."""
    options = state.options
    if allowed is not None:
        row = np.where(allowed, row, -np.inf)
    if state.seen is not None:
        row = _penalize(row, state.seen, options.repetition_penalty)
    if options.greedy:
        return int(np.argmax(row))
    return _filter(row, options)


def verify(
    logits: np.ndarray,
    state: SamplerState,
    draft: Sequence[int],
    allowed: np.ndarray | None = None,
) -> tuple[list[int], list[float]]:
    """The tokens a sample keeps from a checked draft: `logits` [len(draft) + 1, V] are the
    model's after its last token and after each draft token. Row i decides whether draft[i]
    stands: greedy, when it is the row's argmax; sampling, with probability p(draft[i]) under
    the row's filtered distribution (speculative sampling with a draft that is certain of its
    token), else a token is drawn from the rest of that distribution. The first token that
    differs from the draft ends the run; when every draft token stands, the last row adds one
    more. So the tokens are those one-at-a-time decoding gives (greedy) or follow its
    distribution (sampling).

    Returns the kept tokens (1 to len(draft) + 1) and their raw log-probabilities; updates the
    state's seen tokens."""
    if logits.ndim != 2 or logits.shape[0] != len(draft) + 1:
        raise ValueError(f"logits {tuple(logits.shape)} do not match a draft of {len(draft)}")
    logp = log_softmax(logits)
    tokens: list[int] = []
    for i in range(len(draft) + 1):
        choice = _pick(logits[i], state, allowed)
        guess = draft[i] if i < len(draft) else None
        if isinstance(choice, int):
            token = choice
        else:
            assert state.generator is not None
            if guess is not None and state.generator.random() < choice[guess]:
                token = guess
            else:
                if guess is not None:
                    choice = choice.copy()
                    choice[guess] = 0.0
                token = _draw(choice, state.generator)
        state.observe(token)
        tokens.append(token)
        if token != guess:
            break
    return tokens, logp[np.arange(len(tokens)), tokens].tolist()


def sample(
    logits: np.ndarray, states: Sequence[SamplerState], allowed: np.ndarray | None = None
) -> tuple[list[int], list[float]]:
    """Picks one token per row of `logits` [B, V] with `states[i]` for row i; `allowed` [V]
    bool restricts the choice (not the scores).

    Returns the tokens and their log-probabilities under the raw logits. Updates each state's
    seen tokens.
    """
    if logits.ndim != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} samples")
    logp = log_softmax(logits)  # [B, V]
    tokens: list[int] = []
    for i, state in enumerate(states):
        choice = _pick(logits[i], state, allowed)
        if isinstance(choice, int):
            token = choice
        else:
            assert state.generator is not None
            token = _draw(choice, state.generator)
        state.observe(token)
        tokens.append(token)
    scores = logp[np.arange(len(tokens)), tokens].tolist()
    return tokens, scores
