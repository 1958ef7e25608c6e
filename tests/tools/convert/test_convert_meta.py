"""Meta Llama folder -> checkpoint: 1, 2 and 4 model-parallel files give the Hugging Face
weights; the sentencepiece tokenizer.model becomes a tokenizer.json."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

from sax.errors import InvalidArgumentError
from servables.checkpoint import open_checkpoint
from tests.tools.convert.builders import canonical_state, save_meta, tree_digest
from tools.convert import convert
from tools.convert.meta import intermediate_size


@pytest.mark.parametrize(("n_files", "by_vocab"), [(1, False), (2, False), (4, False), (2, True)])
def test_model_parallel_files_merge_into_the_hf_weights(
    tiny_model: Any, tmp_path: pathlib.Path, n_files: int, by_vocab: bool
) -> None:
    src = tmp_path / "meta"
    save_meta(tiny_model, src, n_files, embed_by_vocab=by_vocab)
    ckpt = open_checkpoint(convert("meta", str(src), str(tmp_path / "out")))
    expected = {k: v.to(torch.bfloat16) for k, v in canonical_state(tiny_model).items()}
    got = dict(ckpt.iter_tensors())
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name
    c = ckpt.config
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (64, 128, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (8, 4, 128)
    assert c["tie_word_embeddings"] is False


def test_meta_conversion_is_deterministic_and_casts(
    tiny_model: Any, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "meta"
    save_meta(tiny_model, src, 2)
    for out in ("a", "b"):
        convert("meta", str(src), str(tmp_path / out), dtype="float32", shard_size="50KB")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    ckpt = open_checkpoint(str(tmp_path / "a"))
    assert len(ckpt.shard_files()) > 1
    expected = canonical_state(tiny_model)
    for name, tensor in ckpt.iter_tensors():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16).float()), name


def test_intermediate_size_formula() -> None:
    assert intermediate_size(4096, 256, None) == 11008  # Llama 2 7B
    assert intermediate_size(5120, 256, None) == 13824  # 13B
    assert intermediate_size(8192, 4096, 1.3) == 28672  # 70B
    assert intermediate_size(64, 64, 0.75) == 128  # the tiny test model


def _sentencepiece_model(path: pathlib.Path) -> None:
    """A small sentencepiece BPE model: specials, 256 byte pieces, a few merges."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.trainer_spec.model_type = 2  # BPE
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.byte_fallback = True

    def add(piece: str, score: float, kind: int = 1) -> None:
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind

    add("<unk>", 0, 2)
    add("<s>", 0, 3)
    add("</s>", 0, 3)
    for b in range(256):
        add(f"<0x{b:02X}>", 0, 6)
    merged = ["he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world"]
    for i, piece in enumerate(merged):
        add(piece, -i)
    for i, ch in enumerate("▁helowrd"):
        add(ch, -100 - i)
    path.write_bytes(proto.SerializeToString())


def test_sentencepiece_tokenizer_becomes_tokenizer_json(
    tiny_model: Any, tmp_path: pathlib.Path
) -> None:
    from tokenizers import Tokenizer

    src = tmp_path / "meta"
    save_meta(tiny_model, src, 1)
    _sentencepiece_model(src / "tokenizer.model")
    ckpt = open_checkpoint(convert("meta", str(src), str(tmp_path / "out")))
    folder = pathlib.Path(ckpt.tokenizer_dir())
    assert (folder / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encoding = tok.encode("hello world")
    assert encoding.tokens == ["<s>", "▁hello", "▁world"]
    assert encoding.ids == [1, 259 + 4, 259 + 9]
    assert tok.decode(tok.encode("hello wörld").ids) == "hello wörld"  # ö by byte fallback
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (
        "<s>",
        "</s>",
        True,
    )
    assert (ckpt.config["bos_token_id"], ckpt.config["eos_token_id"]) == (1, 2)


def test_refusals(tiny_model: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"no params\.json"):
        convert("meta", str(tmp_path), str(tmp_path / "out"))
    src = tmp_path / "meta"
    save_meta(tiny_model, src, 1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "ffn_dim_multiplier": 1.0}))
    with pytest.raises(InvalidArgumentError, match="FFN width 128 is not the 192"):
        convert("meta", str(src), str(tmp_path / "out"))
    for p in src.glob("*.pth"):
        p.unlink()
    with pytest.raises(InvalidArgumentError, match="no consolidated"):
        convert("meta", str(src), str(tmp_path / "out"))
