"""GGUF (llama.cpp) -> checkpoint: dequantized with the `gguf` package, Llama names and layout.

The header is parsed by `gguf_file.read_gguf` (plain Python values: `gguf.GGUFReader` costs more
memory than the largest tensor on a large vocabulary); tensor bytes are read with `os.pread` in
row chunks, dequantized with `gguf.quants.dequantize` and cast chunk by chunk, so the process
never holds (or maps) more than a chunk of any tensor. Q and K rows are un-permuted from
llama.cpp's rotary layout back to Hugging Face's, as transformers' GGUF loader does. No torch.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from sax.errors import InvalidArgumentError
from servables.configs.llama import LlamaArchitecture
from tools.convert.checkpoint_writer import (
    SourceModel,
    TensorSource,
    cast,
    check_tensors,
    rotary_rows_to_hf,
    row_chunks,
)
from tools.convert.gguf_file import GgufFile, GgufTensorInfo, read_gguf
from tools.convert.tokenizer_files import GgufVocab, gguf_tokenizer_files

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama",)
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# Tensors llama.cpp adds that Hugging Face Llama models compute instead.
_SKIPPED = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a llama.cpp tensor name (None if it has none)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def _config(meta: dict[str, Any], arch: str, tie: bool, vocab_size: int) -> dict[str, Any]:
    def need(key: str) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise InvalidArgumentError(f"the GGUF file has no {arch}.{key} metadata")
        return value

    heads = int(need("attention.head_count"))
    shape = LlamaArchitecture(
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        model_dim=int(need("embedding_length")),
        hidden_dim=int(need("feed_forward_length")),
        vocab_size=int(meta.get(f"{arch}.vocab_size", vocab_size)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings=tie,
        max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
    )
    rope_dim = meta.get(f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != shape.head_dim:
        raise InvalidArgumentError(
            f"the GGUF file's rotary dimension {rope_dim} is not the head size {shape.head_dim}; "
            "only full-head rotary Llama models are supported"
        )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape.to_hf_config(),
        "hidden_act": "silu",
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return config


def _vocab(meta: dict[str, Any]) -> GgufVocab:
    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise InvalidArgumentError("the GGUF file has no tokenizer.ggml.tokens vocabulary")
    return GgufVocab(
        model=str(meta.get("tokenizer.ggml.model", "gpt2")),
        pre=str(meta.get("tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=meta.get("tokenizer.ggml.token_type", []),
        merges=meta.get("tokenizer.ggml.merges", []),
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        unk_id=token_id("unknown_token_id"),
        pad_id=token_id("padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _source(path: str, info: GgufTensorInfo, name: str, head_dim: int | None) -> TensorSource:
    """A TensorSource reading one GGUF tensor by row chunks (head-aligned for Q/K)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.qtype)
    cols = math.prod(info.shape) // info.rows

    def read(dtype: str) -> Iterator[np.ndarray]:
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in row_chunks(info.rows, cols * 4, head_dim or 1):
                size = (end - start) * info.row_bytes
                buf = os.pread(fd, size, info.offset + start * info.row_bytes)
                if len(buf) != size:
                    raise InvalidArgumentError(f"{path} is truncated inside tensor {info.name}")
                raw = np.frombuffer(buf, dtype=np.uint8).reshape(end - start, info.row_bytes)
                values = dequantize(raw, qtype).reshape(end - start, cols)
                del raw, buf
                if head_dim:
                    values = rotary_rows_to_hf(values, head_dim)
                yield cast(np.asarray(values, dtype=np.float32), "float32", dtype)
        finally:
            os.close(fd)

    return TensorSource(name=name, shape=info.shape, read=read)


def gguf_sources(parsed: GgufFile, config: dict[str, Any]) -> list[TensorSource]:
    """TensorSources for every Llama tensor of the file, under Hugging Face names."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    sources = []
    for tensor in parsed.tensors:
        if tensor.name in _SKIPPED:
            logger.warning("skipping %s: computed from the config instead", tensor.name)
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise InvalidArgumentError(
                f"GGUF tensor {tensor.name} has no Llama counterpart; only Llama-architecture "
                "files convert"
            )
        permute = head_dim if name.endswith(("q_proj.weight", "k_proj.weight")) else None
        sources.append(_source(parsed.path, tensor, name, permute))
    return sources


def read_model(src: str) -> SourceModel:
    """Reads a Llama GGUF file (its tensors dequantized to float32)."""
    if not os.path.isfile(src):
        raise InvalidArgumentError(f"GGUF file {src} does not exist")
    parsed = read_gguf(src)
    meta = parsed.metadata
    arch = str(meta.get("general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise InvalidArgumentError(
            f"{src} holds a {arch or 'unknown'!r} model; only {', '.join(ARCHITECTURES)} converts"
        )
    vocab = _vocab(meta)
    tie = all(t.name != "output.weight" for t in parsed.tensors)
    config = _config(meta, arch, tie, len(vocab.tokens))
    sources = gguf_sources(parsed, config)
    check_tensors(sources, LlamaArchitecture.from_hf_config(config).tensor_shapes(), src)
    tokenizer = gguf_tokenizer_files(vocab, src, config["max_position_embeddings"])
    del parsed, meta, vocab
    return SourceModel(config=config, tensors=sources, tokenizer_files=tokenizer, dtype="float32")
