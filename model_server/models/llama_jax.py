"""A Llama decoder as pure JAX functions over a parameter pytree, with a static KV cache.

The same architecture and conventions as the torch model (`model_server.models.llama_torch`):
RMSNorm in float32, rotary embeddings of Hugging Face's "rotate_half" layout with cos/sin tables
of the same formula (computed with numpy: no torch here), grouped-query attention (query head
h uses KV head h // (H / KV)), SwiGLU, tied or untied output projection. Layer parameters
are stacked on a leading layer axis and the layers run under `jax.lax.scan`, so a step
compiles one layer body whatever the depth.

Parameter layout (`Params`), chosen so that tensor parallelism needs no reshape of a sharded
dimension:
  embed [V, D], lm_head [V, D] (the same array when tied), final_norm [D], and under "layers"
  attn_norm [L, D], wq [L, D, H, hd], wk/wv [L, D, KV, hd], wo [L, H, hd, D], mlp_norm [L, D],
  w_gate/w_up [L, D, F], w_down [L, F, D].
The head dimension of wq and wk (and so of the cached keys) is stored with each rotary pair
(i, i + hd/2) side by side ("interleaved"): rotary embeddings then work on pairs of adjacent
elements, so a head dimension split over devices keeps every pair on one device. Scores are
unchanged (queries and keys share the permutation); values and wo keep the checkpoint's order.

KV cache: keys and values of shape [L, slots, KV, positions, hd] in the weights' dtype.
`prefill` runs one sequence (padded to its bucket) into one slot; `decode` runs one token for
each of several slots, each at its own position, attending to its slot's positions up to its
own over the whole slot length (masked), so decode has one shape per batch size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from servables.configs.llama import LlamaConfig

Params = dict[str, Any]
Cache = tuple[jax.Array, jax.Array]

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def interleave_order(head_dim: int) -> np.ndarray:
    """Index order that puts element j + hd/2 right after element j: [0, hd/2, 1, hd/2+1, ..]."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def rope_tables(config: LlamaConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [length, hd/2] float32: one value per rotary pair, by the torch model's
    formula (`llama_torch.rope_tables`, Hugging Face's): float32 inverse frequencies
    1 / theta^(2i / hd) and float32 angles position * frequency. The frequencies and the
    cos/sin of each float32 angle are computed in float64 and rounded once, so every host gets
    the same tables whatever its numpy build; they agree with torch's float32 functions to
    within their last bit."""
    hd = config.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)  # [hd/2]
    inv_freq = (1.0 / np.float64(config.rope_theta) ** exponents.astype(np.float64)).astype(
        np.float32
    )
    angles = np.outer(np.arange(length, dtype=np.float32), inv_freq)  # [L, hd/2] float32
    wide = angles.astype(np.float64)
    return np.cos(wide).astype(np.float32), np.sin(wide).astype(np.float32)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight * h.astype(x.dtype)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., hd] in interleaved order; cos/sin [..., hd/2] broadcastable (float32)."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.stack([a * c - b * s, b * c + a * s], axis=-1).reshape(x.shape)


def _mlp(x: jax.Array, layer: Params, eps: float) -> jax.Array:
    h = _rms_norm(x, layer["mlp_norm"], eps)
    gate = jnp.einsum("...d,df->...f", h, layer["w_gate"])
    up = jnp.einsum("...d,df->...f", h, layer["w_up"])
    return x + jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, layer["w_down"])


def _qkv(
    h: jax.Array, layer: Params, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h [N, D] -> rotated q [N, H, hd], rotated k and v [N, KV, hd]."""
    q = jnp.einsum("nd,dhk->nhk", h, layer["wq"])
    k = jnp.einsum("nd,dhk->nhk", h, layer["wk"])
    v = jnp.einsum("nd,dhk->nhk", h, layer["wv"])
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _softmax(scores: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Final hidden states [..., D] (after the norm) -> float32 logits [..., V]."""
    return jnp.einsum("...d,vd->...v", hidden, params["lm_head"]).astype(jnp.float32)


def prefill(
    config: LlamaConfig,
    params: Params,
    cache: Cache,
    rope: tuple[jax.Array, jax.Array],
    tokens: jax.Array,
    slot: jax.Array,
) -> tuple[Cache, jax.Array]:
    """tokens [T] at positions [0, T) into `slot` (int32 scalar): writes K/V of every position
    (padding past the prompt is overwritten by decode before anything attends to it) and
    returns the new cache and the final normalized hidden states [T, D]."""
    t = tokens.shape[0]
    heads, kv, hd, eps = config.num_heads, config.num_kv_heads, config.head_dim, config.norm_eps
    group = heads // kv
    cos, sin = rope[0][:t, None], rope[1][:t, None]  # [T, 1, hd/2]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T(query), T(key)]
    x = jnp.take(params["embed"], tokens, axis=0)  # [T, D]
    dtype = x.dtype

    def layer_step(carry: Any, layer: Params) -> tuple[Any, None]:
        x, k_cache, v_cache, index = carry
        h = _rms_norm(x, layer["attn_norm"], eps)
        q, k, v = _qkv(h, layer, cos, sin)
        start = (index, slot, 0, 0, 0)
        k_cache = lax.dynamic_update_slice(k_cache, k.transpose(1, 0, 2)[None, None], start)
        v_cache = lax.dynamic_update_slice(v_cache, v.transpose(1, 0, 2)[None, None], start)
        q = q.reshape(t, kv, group, hd)
        scores = jnp.einsum("tkgd,skd->kgts", q, k) * (hd**-0.5)
        probs = _softmax(scores, causal, dtype)
        attn = jnp.einsum("kgts,skd->tkgd", probs, v).reshape(t, heads, hd)
        x = x + jnp.einsum("thk,hkd->td", attn, layer["wo"])
        return (_mlp(x, layer, eps), k_cache, v_cache, index + 1), None

    init = (x, cache[0], cache[1], jnp.int32(0))
    (x, k_cache, v_cache, _), _ = lax.scan(layer_step, init, params["layers"])
    return (k_cache, v_cache), _rms_norm(x, params["final_norm"], eps)


def decode(
    config: LlamaConfig,
    params: Params,
    cache: Cache,
    rope: tuple[jax.Array, jax.Array],
    tokens: jax.Array,
    slots: jax.Array,
    positions: jax.Array,
) -> tuple[Cache, jax.Array]:
    """One token per row: tokens, slots, positions [B] (int32); row i attends to positions
    <= positions[i] of slot slots[i]. Returns the new cache and float32 logits [B, V]."""
    b = tokens.shape[0]
    heads, kv, hd, eps = config.num_heads, config.num_kv_heads, config.head_dim, config.norm_eps
    group = heads // kv
    cos, sin = rope[0][positions][:, None], rope[1][positions][:, None]  # [B, 1, hd/2]
    span = cache[0].shape[3]
    mask = (jnp.arange(span)[None, :] <= positions[:, None])[:, None, None, :]  # [B,1,1,P]
    x = jnp.take(params["embed"], tokens, axis=0)  # [B, D]
    dtype = x.dtype

    def layer_step(carry: Any, layer: Params) -> tuple[Any, None]:
        x, k_cache, v_cache, index = carry
        h = _rms_norm(x, layer["attn_norm"], eps)
        q, k, v = _qkv(h, layer, cos, sin)  # [B, H, hd], [B, KV, hd]
        k_cache = k_cache.at[index, slots, :, positions].set(k)
        v_cache = v_cache.at[index, slots, :, positions].set(v)
        keys = k_cache[index, slots]  # [B, KV, P, hd]
        values = v_cache[index, slots]
        q = q.reshape(b, kv, group, hd)
        scores = jnp.einsum("bkgd,bkpd->bkgp", q, keys) * (hd**-0.5)
        probs = _softmax(scores, mask, dtype)
        attn = jnp.einsum("bkgp,bkpd->bkgd", probs, values).reshape(b, heads, hd)
        x = x + jnp.einsum("bhk,hkd->bd", attn, layer["wo"])
        return (_mlp(x, layer, eps), k_cache, v_cache, index + 1), None

    init = (x, cache[0], cache[1], jnp.int32(0))
    (x, k_cache, v_cache, _), _ = lax.scan(layer_step, init, params["layers"])
    return (k_cache, v_cache), logits(params, _rms_norm(x, params["final_norm"], eps))


def copy_slot(cache: Cache, src: jax.Array, dst: jax.Array, length: jax.Array) -> Cache:
    """Copies K/V positions [0, length) of slot src into slot dst (int32 scalars)."""
    out = []
    for c in cache:
        rows = c[:, src]  # [L, KV, P, hd]
        keep = (jnp.arange(c.shape[3]) < length)[None, None, :, None]
        out.append(c.at[:, dst].set(jnp.where(keep, rows, c[:, dst])))
    return out[0], out[1]


# Mesh axes of ICI_MESH_SHAPE, outermost first (Saxml's order):
#   replica: whole copies of the weights (nothing is split over it);
#   data:    the residual width D of every weight matrix (2D weight sharding);
#   model:   tensor parallelism: attention heads (or the head dimension) and the MLP width F.
MESH_AXES = ("replica", "data", "model")


class Layout:
    """How one config's tensors split over a mesh's "data" and "model" axes.

    attention: "heads" when H and KV are multiples of the model axis (each device holds whole
      heads); else "head_dim" when the head dimension splits into an even count per device
      (each device holds a slice of every head: SmolLM2's 9 and 3 heads on 4 or 8 devices);
      else "replicated".
    mlp: "hidden" when F is a multiple of the model axis, else "replicated".
    A dimension is split over an axis only when the axis size divides it; otherwise it stays
    whole (for example the vocabulary over a model axis that does not divide it).
    """

    def __init__(self, config: LlamaConfig, data: int, model: int) -> None:
        self.data, self.model = data, model
        hd = config.head_dim
        if model == 1:
            self.attention = "replicated"
        elif config.num_heads % model == 0 and config.num_kv_heads % model == 0:
            self.attention = "heads"
        elif hd % model == 0 and (hd // model) % 2 == 0:
            self.attention = "head_dim"
        else:
            self.attention = "replicated"
        self.mlp = "hidden" if model > 1 and config.hidden_dim % model == 0 else "replicated"
        self._d = "data" if data > 1 and config.model_dim % data == 0 else None
        self._v = "model" if model > 1 and config.vocab_size % model == 0 else None

    def describe(self) -> str:
        """One line for logs and docs."""
        return (
            f"data={self.data} (D {'split' if self._d else 'whole'}), model={self.model} "
            f"(attention {self.attention}, mlp {self.mlp}, vocab "
            f"{'split' if self._v else 'whole'})"
        )

    def _attn(self) -> tuple[str | None, str | None]:
        """Axes of the (heads, head_dim) dimensions."""
        if self.attention == "heads":
            return "model", None
        if self.attention == "head_dim":
            return None, "model"
        return None, None

    def specs(self) -> dict[str, Any]:
        """PartitionSpec of every parameter (the `Params` tree) and of the KV cache ("cache")."""
        from jax.sharding import PartitionSpec as P

        d, v = self._d, self._v
        heads, hd = self._attn()
        f = "model" if self.mlp == "hidden" else None
        return {
            "embed": P(v, d),
            "lm_head": P(v, d),
            "final_norm": P(),
            "layers": {
                "attn_norm": P(),
                "wq": P(None, d, heads, hd),
                "wk": P(None, d, heads, hd),
                "wv": P(None, d, heads, hd),
                "wo": P(None, heads, hd, d),
                "mlp_norm": P(),
                "w_gate": P(None, d, f),
                "w_up": P(None, d, f),
                "w_down": P(None, f, d),
            },
            "cache": P(None, None, heads, None, hd),
        }
