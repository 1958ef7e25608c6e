"""Tokenizer files for a checkpoint's tokenizer/ folder, from a GGUF vocabulary, a Hugging Face
folder or a sentencepiece tokenizer.model.

The output is what `transformers.AutoTokenizer.from_pretrained(folder)` and
`tokenizers.Tokenizer.from_file(folder + "/tokenizer.json")` read: tokenizer.json and
tokenizer_config.json (bos/eos/unk/pad tokens, add_bos_token, chat_template).

GGUF byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2", e.g. SmolLM2, Llama 3) are built
here with `tokenizers` alone, the way transformers' GGUF loader builds them; any other GGUF
tokenizer goes through transformers (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sax.errors import InvalidArgumentError
from tools.convert.checkpoint_writer import json_bytes

logger = logging.getLogger(__name__)

# Files copied from a Hugging Face folder when present.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer name -> split regex, as transformers' GGUF loader maps them. Names
# mapped to None use GPT-2's byte-level split; unknown names go through transformers.
_PRE_SPLITS: Mapping[str, str | None] = {
    "default": None,
    "gpt-2": None,
    "gpt2": None,
    "smollm": None,
    "starcoder": None,
    "refact": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4


@dataclass(frozen=True)
class GgufVocab:
    """The tokenizer a GGUF file describes (its tokenizer.* metadata)."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (sentencepiece), ...
    pre: str  # tokenizer.ggml.pre: the pre-tokenizer name
    tokens: Sequence[str]
    token_types: Sequence[int]
    merges: Sequence[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _token_name(vocab: GgufVocab, token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < len(vocab.tokens):
        return None
    return vocab.tokens[token_id]


def tokenizer_config(
    *,
    bos: str | None,
    eos: str | None,
    unk: str | None,
    pad: str | None,
    add_bos: bool,
    add_eos: bool,
    chat_template: str | None,
    model_max_length: int | None,
) -> dict[str, Any]:
    """A tokenizer_config.json for a tokenizer.json-only tokenizer."""
    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for key, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)):
        config[key] = value
    if pad is not None:
        config["pad_token"] = pad
    if chat_template:
        config["chat_template"] = chat_template
    if model_max_length:
        config["model_max_length"] = model_max_length
    return config


def byte_level_bpe(vocab: GgufVocab) -> Any:
    """A `tokenizers.Tokenizer` for a GGUF byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    ids = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(vocab.tokens)
    }
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    tok = Tokenizer(
        BPE(
            vocab=ids,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_SPLITS[vocab.pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = list(vocab.token_types) or [0] * len(vocab.tokens)
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(vocab.tokens, types, strict=False)
        if kind == _CONTROL and set(t) <= alphabet
    ]
    if control:
        tok.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(vocab.tokens, types, strict=False)
        if kind == _USER_DEFINED and t in ids
    ]
    if user:
        tok.add_tokens(user)
    bos = _token_name(vocab, vocab.bos_id)
    eos = _token_name(vocab, vocab.eos_id)
    single, pair, specials = "$A:0", "$A:0 $B:1", []
    if vocab.add_bos and bos is not None:
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        specials.append((bos, vocab.bos_id))
    if vocab.add_eos and eos is not None:
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
        specials.append((eos, vocab.eos_id))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=sorted(set(specials))
    )
    return tok


def gguf_tokenizer_files(
    vocab: GgufVocab, gguf_path: str, model_max_length: int | None
) -> dict[str, bytes]:
    """tokenizer/ files for a GGUF file's vocabulary."""
    if vocab.model == "gpt2" and vocab.pre in _PRE_SPLITS:
        tok = byte_level_bpe(vocab)
        config = tokenizer_config(
            bos=_token_name(vocab, vocab.bos_id),
            eos=_token_name(vocab, vocab.eos_id),
            unk=_token_name(vocab, vocab.unk_id),
            pad=_token_name(vocab, vocab.pad_id),
            add_bos=vocab.add_bos,
            add_eos=vocab.add_eos,
            chat_template=vocab.chat_template,
            model_max_length=model_max_length,
        )
        return {
            "tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": json_bytes(config),
        }
    logger.info("building the %s/%s GGUF tokenizer with transformers", vocab.model, vocab.pre)
    return _transformers_gguf_tokenizer(gguf_path, vocab)


def _transformers_gguf_tokenizer(gguf_path: str, vocab: GgufVocab) -> dict[str, bytes]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InvalidArgumentError(
            f"the GGUF tokenizer ({vocab.model}/{vocab.pre}) needs transformers: pip install "
            f"'sax-cluster[convert]' ({e})"
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(gguf_path)),
            gguf_file=os.path.basename(gguf_path),
            local_files_only=True,
        )
    except (ValueError, OSError, KeyError) as e:
        raise InvalidArgumentError(
            f"cannot build the tokenizer of {gguf_path} ({vocab.model}/{vocab.pre}): {e}"
        ) from e
    return _saved_files(tok, chat_template=vocab.chat_template)


def _saved_files(tok: Any, chat_template: str | None = None, **config: Any) -> dict[str, bytes]:
    """The files of a transformers tokenizer's save_pretrained, with the chat template and the
    given keys written into tokenizer_config.json."""
    with tempfile.TemporaryDirectory(prefix="sax-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
    cfg = json.loads(out.get("tokenizer_config.json", b"{}"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    template = out.pop("chat_template.jinja", b"").decode() or chat_template
    if template:
        cfg["chat_template"] = template
    cfg.update(config)
    cfg.setdefault("add_bos_token", bool(getattr(tok, "add_bos_token", False)))
    cfg.setdefault("add_eos_token", bool(getattr(tok, "add_eos_token", False)))
    out["tokenizer_config.json"] = json_bytes(cfg)
    return out


def hf_tokenizer_files(folder: str) -> dict[str, bytes]:
    """The tokenizer files of a Hugging Face model folder, copied as they are."""
    out = {}
    for name in HF_TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    if "tokenizer.json" not in out:
        if "tokenizer.model" in out:
            out.update(sentencepiece_tokenizer_files(os.path.join(folder, "tokenizer.model")))
        else:
            logger.warning("%s has no tokenizer.json or tokenizer.model", folder)
    return out


def sentencepiece_tokenizer_files(model_path: str) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json built from a sentencepiece BPE tokenizer.model
    (as transformers builds Llama tokenizers: byte fallback, "▁" spaces, BOS added), plus the
    model file itself. A file that is not a sentencepiece model (e.g. Llama 3's tiktoken file) is
    only copied, with a warning."""
    with open(model_path, "rb") as f:
        raw = f.read()
    out = {"tokenizer.model": raw}
    try:
        from google.protobuf.message import DecodeError
        from transformers.convert_slow_tokenizer import import_protobuf
        from transformers.models.llama.tokenization_llama import LlamaTokenizer
        from transformers.tokenization_utils_base import generate_merges

        proto = import_protobuf().ModelProto()
        proto.ParseFromString(raw)
    except (ImportError, DecodeError, RuntimeError) as e:
        logger.warning(
            "%s is not a sentencepiece model this version can read (%s); copied it as is, "
            "without a tokenizer.json",
            model_path,
            e,
        )
        return out
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if not pieces or proto.trainer_spec.model_type != 2:  # 2: BPE
        logger.warning("%s is not a sentencepiece BPE model; copied it as is", model_path)
        return out
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    scores = {piece: score for piece, score, _ in pieces}
    spec = proto.trainer_spec

    def piece(i: int, default: str) -> str:
        return pieces[i][0] if 0 <= i < len(pieces) else default

    tok = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        unk_token=piece(spec.unk_id, "<unk>"),
        bos_token=piece(spec.bos_id, "<s>"),
        eos_token=piece(spec.eos_id, "</s>"),
        add_bos_token=True,
        add_eos_token=False,
    )
    out.update(_saved_files(tok, add_bos_token=True, add_eos_token=False))
    return out
