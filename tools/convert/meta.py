"""Meta Llama (params.json + consolidated.NN.pth + tokenizer.model) -> checkpoint.

Model-parallel files (13B: 2, 70B: 8) are merged the way Meta split them: column-parallel
weights (wq, wk, wv, w1, w3, output) are concatenated on dim 0, row-parallel ones (wo, w2) on
dim 1, tok_embeddings on dim 1 (Llama 1/2) or 0 (Llama 3, told apart by shape), norms are
replicated. Q and K rows go from Meta's interleaved rotary layout to Hugging Face's
("rotate_half"), as transformers' convert_llama_weights_to_hf does. Every .pth is memory-mapped
and read by slices, one output chunk at a time.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sax.errors import InvalidArgumentError
from servables.configs.llama import LlamaArchitecture
from tools.convert import torch_io
from tools.convert.checkpoint_writer import (
    SourceModel,
    TensorSource,
    check_tensors,
    rotary_rows_to_hf,
    row_chunks,
)
from tools.convert.tokenizer_files import sentencepiece_tokenizer_files

logger = logging.getLogger(__name__)

# Meta layer tensor -> (Hugging Face name, how the model-parallel files split it).
_LAYER = {
    "attention.wq": ("self_attn.q_proj", "col"),
    "attention.wk": ("self_attn.k_proj", "col"),
    "attention.wv": ("self_attn.v_proj", "col"),
    "attention.wo": ("self_attn.o_proj", "row"),
    "feed_forward.w1": ("mlp.gate_proj", "col"),
    "feed_forward.w3": ("mlp.up_proj", "col"),
    "feed_forward.w2": ("mlp.down_proj", "row"),
    "attention_norm": ("input_layernorm", "rep"),
    "ffn_norm": ("post_attention_layernorm", "rep"),
}
_GLOBAL = {
    "tok_embeddings": ("model.embed_tokens.weight", "emb"),
    "norm": ("model.norm.weight", "rep"),
    "output": ("lm_head.weight", "col"),
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_SKIPPED = ("rope.freqs",)


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's code derives from params.json."""
    hidden = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _source(
    files: list[torch_io.TorchFile],
    key: str,
    name: str,
    split: str,
    shape: tuple[int, ...],
    head_dim: int | None,
) -> TensorSource:
    """A TensorSource merging `key` from every model-parallel file."""
    import torch

    def col(dtype: str) -> Iterator[np.ndarray]:
        for f in files:
            part = f.tensors[key]
            for a, b in row_chunks(part.shape[0], part.shape[1] * 4, head_dim or 1):
                rows = part[a:b]
                out = rotary_rows_to_hf(rows, head_dim) if head_dim else rows
                yield torch_io.to_numpy(out, dtype).reshape(-1)
                f.release(rows)

    def row(dtype: str) -> Iterator[np.ndarray]:
        parts = [f.tensors[key] for f in files]
        for a, b in row_chunks(shape[0], shape[-1] * 4):
            pieces = [p[a:b] for p in parts]
            yield torch_io.to_numpy(torch.cat(pieces, dim=1), dtype).reshape(-1)
            for f, piece in zip(files, pieces, strict=True):
                f.release(piece)

    def rep(dtype: str) -> Iterator[np.ndarray]:
        yield torch_io.to_numpy(files[0].tensors[key], dtype).reshape(-1)

    read: Callable[[str], Iterator[np.ndarray]] = {"col": col, "row": row, "rep": rep}[split]
    return TensorSource(name=name, shape=tuple(shape), read=read)


def _merged_shape(files: list[torch_io.TorchFile], key: str, split: str) -> tuple[int, ...]:
    shapes = [tuple(f.tensors[key].shape) for f in files]
    if split == "rep" or len(files) == 1:
        return shapes[0]
    axis = 0 if split == "col" else 1
    total = sum(s[axis] for s in shapes)
    return (total, shapes[0][1]) if axis == 0 else (shapes[0][0], total)


def _params(src: str) -> dict[str, Any]:
    path = os.path.join(src, "params.json")
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"{src} has no params.json; point at a Meta Llama folder")
    with open(path) as f:
        return dict(json.load(f))


def read_model(src: str) -> SourceModel:
    """Reads a Meta Llama folder (dtype bfloat16, as Meta's weights)."""
    params = _params(src)
    paths = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
    if not paths:
        raise InvalidArgumentError(f"{src} has no consolidated.NN.pth files")
    files = [torch_io.load(p) for p in paths]
    dim, heads = int(params["dim"]), int(params["n_heads"])
    kv_heads = int(params.get("n_kv_heads") or heads)
    n = len(files)
    if heads % n or kv_heads % n:
        raise InvalidArgumentError(
            f"{src}: {n} model-parallel files do not divide {heads} heads / {kv_heads} KV heads"
        )
    head_dim = dim // heads
    emb = tuple(files[0].tensors["tok_embeddings.weight"].shape)
    vocab = int(params.get("vocab_size") or -1)
    by_vocab = n > 1 and emb[1] == dim  # Llama 3 splits the embedding by vocabulary
    vocab = vocab if vocab > 0 else emb[0] * (n if by_vocab else 1)
    sources = []
    for key in sorted(files[0].tensors):
        base = key.removesuffix(".weight")
        if base in _SKIPPED:
            continue
        match = _LAYER_RE.match(key)
        if match and match.group(2) in _LAYER:
            suffix, split = _LAYER[match.group(2)]
            name = f"model.layers.{match.group(1)}.{suffix}.weight"
        elif base in _GLOBAL:
            name, split = _GLOBAL[base]
        else:
            raise InvalidArgumentError(f"{paths[0]}: tensor {key} has no Llama counterpart")
        if split == "emb":
            split = "col" if n == 1 or by_vocab else "row"
        missing = [f.path for f in files if key not in f.tensors]
        if missing:
            raise InvalidArgumentError(f"tensor {key} is missing from {missing}")
        shape = _merged_shape(files, key, split)
        qk = name.endswith(("q_proj.weight", "k_proj.weight"))
        sources.append(_source(files, key, name, split, shape, head_dim if qk else None))
    ffn = next(t.shape[0] for t in sources if t.name.endswith("gate_proj.weight"))
    expected_ffn = intermediate_size(
        dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
    )
    if ffn != expected_ffn:
        raise InvalidArgumentError(
            f"{src}: the weights' FFN width {ffn} is not the {expected_ffn} params.json implies"
        )
    shape = LlamaArchitecture(
        num_layers=int(params["n_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        model_dim=dim,
        hidden_dim=ffn,
        vocab_size=vocab,
        rope_theta=float(params.get("rope_theta", 10000.0)),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        tie_embeddings=False,
        max_seq_len=int(params.get("max_seq_len", 4096)),
    )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape.to_hf_config(),
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if params.get("use_scaled_rope"):
        logger.warning("params.json asks for scaled RoPE (Llama 3.1), which is not converted")
    check_tensors(sources, shape.tensor_shapes(), src)
    tokenizer: dict[str, bytes] = {}
    tokenizer_model = os.path.join(src, "tokenizer.model")
    if os.path.isfile(tokenizer_model):
        tokenizer = sentencepiece_tokenizer_files(tokenizer_model)
        _set_special_ids(config, tokenizer)
    else:
        logger.warning("%s has no tokenizer.model; the checkpoint will have no tokenizer", src)
    return SourceModel(config=config, tensors=sources, tokenizer_files=tokenizer, dtype="bfloat16")


def _set_special_ids(config: dict[str, Any], tokenizer: dict[str, bytes]) -> None:
    """bos/eos ids from the built tokenizer.json, when there is one."""
    if "tokenizer.json" not in tokenizer or "tokenizer_config.json" not in tokenizer:
        return
    vocab = json.loads(tokenizer["tokenizer.json"])["model"]["vocab"]
    tok_config = json.loads(tokenizer["tokenizer_config.json"])
    for key in ("bos", "eos"):
        token = tok_config.get(f"{key}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token in vocab:
            config[f"{key}_token_id"] = int(vocab[token])
