"""Token sampling for a batch of samples, each with its own options and random generator.

Per row, in order: repetition penalty (CTRL style: a seen token's logit is divided by the
penalty when positive, multiplied when negative), then greedy argmax when the temperature is 0
or top_k is 1; otherwise temperature, top_k, top_p (on what top_k kept) and a draw from the
row's seeded `torch.Generator`. A token's score is the log-softmax of the raw logits
(temperature 1, no penalty) at the chosen token, so a sample's score is log p(text | prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_server.engine.request import SampleOptions


class SamplerState:
    """One sample's random generator and the tokens it has seen (for the repetition penalty)."""

    def __init__(self, options: SampleOptions, vocab_size: int, prompt: Sequence[int]) -> None:
        self.options = options
        self.generator: torch.Generator | None = None
        if not options.greedy:
            self.generator = torch.Generator().manual_seed(options.seed)
        self.seen: torch.Tensor | None = None  # [V] bool
        if options.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt:
                self.seen[torch.tensor(list(prompt), dtype=torch.long)] = True

    def observe(self, token: int) -> None:
        """Records a generated token."""
        if self.seen is not None:
            self.seen[token] = True


def _penalize(row: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on the seen tokens of one row of logits: [V] -> [V]."""
    penalized = torch.where(row > 0, row / penalty, row * penalty)
    return torch.where(seen, penalized, row)


def _filter(row: torch.Tensor, options: SampleOptions) -> torch.Tensor:
    """Probabilities of one row after temperature, top_k and top_p: [V] logits -> [V] probs."""
    # Shifted so the largest logit is 0 first: a tiny temperature then gives -inf and 0, never
    # inf - inf = NaN.
    row = (row - row.max()) / options.temperature
    if 0 < options.top_k < row.numel():
        kth = torch.topk(row, options.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of likelier tokens
        drop = before >= options.top_p  # the first token is always kept
        probs = probs.clone()
        probs[order[drop]] = 0.0
    return probs


def sample(logits: torch.Tensor, states: Sequence[SamplerState]) -> tuple[list[int], list[float]]:
    """Picks one token per row of `logits` [B, V] (float, CPU) with `states[i]` for row i.

    Returns the tokens and their log-probabilities under the raw logits. Updates each state's
    seen tokens.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} samples")
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    tokens: list[int] = []
    for i, state in enumerate(states):
        options = state.options
        row = logits[i]  # [V]
        if state.seen is not None:
            row = _penalize(row, state.seen, options.repetition_penalty)
        if options.greedy:
            token = int(torch.argmax(row))
        else:
            probs = _filter(row, options)
            token = int(torch.multinomial(probs, 1, generator=state.generator))
        state.observe(token)
        tokens.append(token)
    index = torch.tensor(tokens, dtype=torch.long)[:, None]  # [B, 1]
    scores = torch.gather(logp, 1, index)[:, 0].tolist()
    return tokens, scores
