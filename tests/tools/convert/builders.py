"""Builders of small models in every source format the converters read: Hugging Face folders
(safetensors or .bin, sharded or not), Meta Llama folders (1..N model-parallel files) and GGUF
files, all from one tiny random Llama."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}


def tiny_llama(*, tie: bool = False, seed: int = 0, **overrides: Any) -> Any:
    """A random transformers LlamaForCausalLM (float32; every weight random, norms too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tie, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def canonical_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's names (no lm_head when tied)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_hf(model: Any, path: pathlib.Path, *, fmt: str = "safetensors", shard: str = "") -> None:
    """A Hugging Face folder: fmt "safetensors" (transformers' save_pretrained, sharded when
    `shard` is set) or "bin" (pytorch_model*.bin as older transformers wrote them)."""
    if fmt == "safetensors":
        model.save_pretrained(path, max_shard_size=shard or "10GB")
        return
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = model.state_dict()
    if not shard:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = sorted(state)
    groups = [names[i : i + 5] for i in range(0, len(names), 5)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save({n: state[n].clone() for n in group}, path / file)
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def save_hf_tokenizer(path: pathlib.Path) -> None:
    """A small byte-level BPE tokenizer saved the transformers way into path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"])
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello there"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def _meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face Q/K rows -> Meta's interleaved rotary layout (the inverse of the converter)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def save_meta(
    model: Any, path: pathlib.Path, n_files: int, *, embed_by_vocab: bool = False
) -> None:
    """A Meta Llama folder with n_files model-parallel consolidated.NN.pth files."""
    cfg = model.config
    state = model.state_dict()
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    meta: dict[str, tuple[torch.Tensor, int | None]] = {
        "tok_embeddings.weight": (state["model.embed_tokens.weight"], 0 if embed_by_vocab else 1),
        "norm.weight": (state["model.norm.weight"], None),
        "output.weight": (state["lm_head.weight"], 0),
    }
    for i in range(cfg.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        meta[m + "attention.wq.weight"] = (
            _meta_rows(state[p + "self_attn.q_proj.weight"], heads),
            0,
        )
        meta[m + "attention.wk.weight"] = (_meta_rows(state[p + "self_attn.k_proj.weight"], kv), 0)
        meta[m + "attention.wv.weight"] = (state[p + "self_attn.v_proj.weight"], 0)
        meta[m + "attention.wo.weight"] = (state[p + "self_attn.o_proj.weight"], 1)
        meta[m + "feed_forward.w1.weight"] = (state[p + "mlp.gate_proj.weight"], 0)
        meta[m + "feed_forward.w3.weight"] = (state[p + "mlp.up_proj.weight"], 0)
        meta[m + "feed_forward.w2.weight"] = (state[p + "mlp.down_proj.weight"], 1)
        meta[m + "attention_norm.weight"] = (state[p + "input_layernorm.weight"], None)
        meta[m + "ffn_norm.weight"] = (state[p + "post_attention_layernorm.weight"], None)
    meta["rope.freqs"] = (torch.ones(cfg.hidden_size // heads // 2), None)
    path.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        part = {}
        for name, (t, dim) in meta.items():
            part[name] = t.clone() if dim is None else t.chunk(n_files, dim=dim)[k].clone()
        torch.save(
            {n: t.to(torch.bfloat16) for n, t in part.items()}, path / f"consolidated.{k:02d}.pth"
        )
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": kv,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": 10000.0,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 64,
        "ffn_dim_multiplier": 0.75,  # int(0.75 * int(8 * 64 / 3)) = 127 -> 128
    }
    (path / "params.json").write_text(json.dumps(params))


def hf_to_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face Q/K rows -> llama.cpp's (as llama.cpp's convert_hf_to_gguf permutes)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(
    model: Any,
    path: pathlib.Path,
    qtypes: Mapping[str, Any] | None = None,
    *,
    sentencepiece: bool = False,
) -> None:
    """A llama GGUF file of the model with a byte-level BPE vocabulary (or with sentencepiece, a
    "llama" one of 272 tokens); qtypes maps a
    llama.cpp tensor name or its last parts (e.g. "attn_q.weight") to a GGMLQuantizationType
    (F32 otherwise)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    cfg = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if sentencepiece:  # llama.cpp's "llama" vocabulary: specials, 256 bytes, scored pieces
        pieces = ["▁", "h", "e", "l", "o", "▁h", "▁he", "ll", "llo", "▁hello", "w", "▁w", "d"]
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
        assert len(tokens) == cfg.vocab_size, len(tokens)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
    else:  # byte-level BPE without merges
        from tools.convert.tokenizer_files import bytes_to_unicode

        spelled = [bytes_to_unicode()[b] for b in range(32, 32 + cfg.vocab_size - 2)]
        tokens = ["<s>", "</s>", *spelled]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
        w.add_token_merges([])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, value in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in names:
            gname = names[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        if gname.endswith("attn_q.weight"):
            value = hf_to_gguf_rows(value, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            value = hf_to_gguf_rows(value, cfg.num_key_value_heads)
        qtype = next(
            (q for s, q in (qtypes or {}).items() if gname == s or gname.endswith("." + s)), Q.F32
        )
        if value.ndim == 1:
            qtype = Q.F32
        data = gguf.quants.quantize(np.ascontiguousarray(value), qtype)
        w.add_tensor(
            gname, data, raw_shape=data.shape if qtype in (Q.F32, Q.F16) else None, raw_dtype=qtype
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tree_digest(root: pathlib.Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


BLOOM = {"vocab_size": 320, "hidden_size": 256, "n_layer": 2, "n_head": 4}


def tiny_bloom(*, seed: int = 0, **overrides: Any) -> Any:
    """A random transformers BloomForCausalLM (float32; weights, norms and biases random)."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(**{**BLOOM, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.1, 0.1)
            else:
                p.normal_(0.0, 0.05 if name.endswith("bias") else 0.3)
    return model.eval()


def save_bloom_tokenizer(path: pathlib.Path) -> None:
    """A small byte-level BPE tokenizer with BLOOM's special tokens (<unk>, <s>, </s>, <pad> as
    ids 0..3) and no chat template, saved the transformers way into path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(["hello world", "你好 世界", "the quick brown fox"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(path)
