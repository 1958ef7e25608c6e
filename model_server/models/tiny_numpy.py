"""TinyLM: a byte-level language model with random weights, in numpy (Saxml's "test mode").

Tokens are the UTF-8 bytes of the text (0..255) plus BOS=256 and EOS=257 (`ByteTokenizer`).
The model looks at the last `CONTEXT` tokens: their embeddings, scaled by per-position gains,
are summed, passed through `num_layers` residual tanh MLP layers and projected to logits. It is
not a transformer and its text is gibberish; it exercises the serving path with real numbers.
It is served by the engine like every model (`model_server.backends.numpy.tiny_runner`);
`ALLOWED` restricts sampling to printable ASCII plus EOS so that outputs are readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from servables.configs.test import TinyLM

BOS = 256
EOS = 257
VOCAB_SIZE = 258
# Tokens the model conditions on.
CONTEXT = 4
# Logit offset on EOS so that continuations are not cut short at once.
_EOS_BIAS = -3.0
# Gain of the output projection: logits of a few units, so greedy choices are clear.
_OUT_GAIN = 4.0


def _allowed_mask() -> np.ndarray:
    mask = np.zeros(VOCAB_SIZE, dtype=bool)
    mask[32:127] = True  # printable ASCII
    mask[EOS] = True
    return mask


# Tokens a generation may pick ([V] bool).
ALLOWED = _allowed_mask()


class ByteTokenizer:
    """TinyLM's tokenizer: UTF-8 bytes, BOS first; text of invalid bytes decodes as U+FFFD."""

    bos_id = BOS
    eos_ids = (EOS,)
    add_bos = True

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """BOS (unless add_bos is False) followed by the UTF-8 bytes of text."""
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if add_bos is not False else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of the byte tokens (BOS and EOS left out)."""
        return bytes(t for t in ids if t < BOS).decode("utf-8", errors="replace")


@dataclass
class Weights:
    embed: np.ndarray  # [V, D]
    pos_gain: np.ndarray  # [K, D]
    layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # ([D, D], [D], [D, D]) each
    out: np.ndarray  # [D, V]
    out_bias: np.ndarray  # [V]

    @classmethod
    def random(cls, config: TinyLM) -> Weights:
        rng = np.random.default_rng(config.seed)
        d, v = config.model_dim, VOCAB_SIZE
        scale = 1.0 / np.sqrt(d)

        def normal(*shape: int, std: float) -> np.ndarray:
            return (rng.standard_normal(shape) * std).astype(np.float32)

        embed = normal(v, d, std=1.0)
        pos_gain = (1.0 / (1.0 + np.arange(CONTEXT, dtype=np.float32)))[:, None] * np.ones(
            (CONTEXT, d), dtype=np.float32
        )
        layers = [
            (normal(d, d, std=scale * 2), normal(d, std=0.1), normal(d, d, std=scale))
            for _ in range(config.num_layers)
        ]
        out = normal(d, v, std=scale * _OUT_GAIN)
        out_bias = np.zeros(v, dtype=np.float32)
        out_bias[EOS] = _EOS_BIAS
        return cls(embed, pos_gain, layers, out, out_bias)

    def nbytes(self) -> int:
        arrays = [self.embed, self.pos_gain, self.out, self.out_bias]
        arrays += [a for layer in self.layers for a in layer]
        return sum(a.nbytes for a in arrays)


def forward(w: Weights, contexts: np.ndarray) -> np.ndarray:
    """Logits of the next token after each context: [B, K] int -> [B, V] float32."""
    x = (w.embed[contexts] * w.pos_gain[None]).sum(axis=1)  # [B, D]
    h = np.tanh(x)
    for w1, b1, w2 in w.layers:
        h = h + np.tanh(np.tanh(h @ w1 + b1) @ w2)  # [B, D]
    return h @ w.out + w.out_bias  # [B, V] float32


def contexts(tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """For each position p, the CONTEXT tokens before p (left-padded with BOS): [P, K]."""
    padded = [BOS] * CONTEXT + list(tokens)
    return np.array([padded[p : p + CONTEXT] for p in positions], dtype=np.int64)
