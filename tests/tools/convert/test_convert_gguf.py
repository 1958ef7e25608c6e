"""GGUF -> checkpoint: tensors equal to what transformers loads from the same file, tokenizer
encoding exactly like transformers' GGUF tokenizer, identical bytes on a second conversion."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from sax.errors import InvalidArgumentError
from servables.checkpoint import open_checkpoint
from tests.tools.convert.builders import tree_digest, write_gguf
from tools.convert import checkpoint_writer as common
from tools.convert import convert
from tools.convert.gguf_file import read_gguf

TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "emoji 🤖, accents ünïcödé, CJK 漢字",
    "numbers 1234567 and\ttabs\n\n  spaces",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>special <repo_name> tokens",
]


def _gguf_qtypes() -> dict[str, Any]:
    from gguf import GGMLQuantizationType as Q

    return {
        "token_embd.weight": Q.Q8_0,
        "attn_q.weight": Q.Q8_0,
        "attn_k.weight": Q.F16,
        "ffn_up.weight": Q.BF16,
        "output.weight": Q.F16,
    }


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_model, path, _gguf_qtypes())
    return path


def _transformers_state(path: pathlib.Path | str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return dict(model.state_dict())


def test_our_header_reader_agrees_with_gguf_reader(tiny_gguf: pathlib.Path) -> None:
    from gguf import GGUFReader

    ours = read_gguf(str(tiny_gguf))
    theirs = GGUFReader(str(tiny_gguf))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.offset, a.nbytes, a.qtype) == (b.data_offset, b.n_bytes, int(b.tensor_type))
        assert a.dims == tuple(int(d) for d in b.shape)
    assert ours.metadata["llama.block_count"] == 2
    assert (
        ours.metadata["tokenizer.ggml.tokens"] == theirs.fields["tokenizer.ggml.tokens"].contents()
    )


def test_tiny_gguf_matches_transformers_and_the_source_model(
    tiny_gguf: pathlib.Path, tiny_model: Any, tmp_path: pathlib.Path
) -> None:
    path = convert("gguf", str(tiny_gguf), str(tmp_path / "ckpt"))
    ckpt = open_checkpoint(path)
    reference = _transformers_state(tiny_gguf)
    source = tiny_model.state_dict()
    got = dict(ckpt.iter_tensors())
    assert set(got) == set(source)
    quantized = ("embed_tokens", "q_proj", "k_proj", "up_proj", "lm_head")
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name
        if any(q in name for q in quantized):
            assert torch.allclose(tensor, source[name], atol=0.05), name
        else:
            assert torch.equal(tensor, source[name]), name  # F32 in the file: exact
    config = ckpt.config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert config["tie_word_embeddings"] is False
    assert config["rms_norm_eps"] == 1e-5
    assert config["torch_dtype"] == "float32"


def test_chunked_reads_give_the_same_bytes(
    tiny_gguf: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert("gguf", str(tiny_gguf), str(tmp_path / "whole"), dtype="bfloat16")
    monkeypatch.setattr(common, "CHUNK_BYTES", 700)  # a few rows (Q/K: one head) per chunk
    convert("gguf", str(tiny_gguf), str(tmp_path / "rows"), dtype="bfloat16")
    assert tree_digest(tmp_path / "whole") == tree_digest(tmp_path / "rows")


def test_other_gguf_vocabularies_go_through_transformers(tmp_path: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    from tests.tools.convert.builders import tiny_llama

    path = tmp_path / "sp.gguf"
    write_gguf(tiny_llama(vocab_size=272, seed=2), path, sentencepiece=True)
    ckpt = open_checkpoint(convert("gguf", str(path), str(tmp_path / "out")))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(ckpt.tokenizer_dir())
    for text in ("hello world", "hello wörld", " hello"):
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert ours("hello")["input_ids"][0] == 1  # BOS, as the file says
    config = json.loads(pathlib.Path(ckpt.tokenizer_dir(), "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for m in messages %}")
    assert config["add_bos_token"] is True


def test_not_a_gguf_file_is_refused(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InvalidArgumentError, match="not a GGUF file"):
        convert("gguf", str(bad), str(tmp_path / "out"))
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        convert("gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out"))


def test_truncated_gguf_is_refused(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-1000])
    with pytest.raises(InvalidArgumentError, match="truncated"):
        convert("gguf", str(cut), str(tmp_path / "out"))


# --- the real SmolLM2 file ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return convert("gguf", smollm2_gguf, str(tmp_path_factory.mktemp("smollm2") / "a"))


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_gguf: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf)
    )


def test_smollm2_config_and_layout(smollm2_ckpt: str) -> None:
    ckpt = open_checkpoint(smollm2_ckpt)
    c = ckpt.config
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        30,
        9,
        3,
    )
    assert (c["hidden_size"], c["intermediate_size"], c["vocab_size"]) == (576, 1536, 49152)
    assert (c["rope_theta"], c["rms_norm_eps"], c["tie_word_embeddings"]) == (100000.0, 1e-5, True)
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    names = ckpt.tensor_names()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    info = ckpt.tensor_info()
    assert info["model.embed_tokens.weight"] == ("F32", (49152, 576))
    assert info["model.layers.0.self_attn.k_proj.weight"] == ("F32", (192, 576))


def test_smollm2_tokenizer_encodes_like_transformers(
    smollm2_ckpt: str, reference_tokenizer: Any
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = open_checkpoint(smollm2_ckpt).tokenizer_dir()
    raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(folder)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    chat = reference_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
    for text in [*TEXTS, chat]:
        expected = reference_tokenizer(text)["input_ids"]
        assert raw.encode(text).ids == expected, text
        assert loaded(text)["input_ids"] == expected, text
        assert raw.decode(expected, skip_special_tokens=False) == reference_tokenizer.decode(
            expected
        )
    config = json.loads(pathlib.Path(folder, "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" == reference_tokenizer.bos_token
    assert config["eos_token"] == "<|im_end|>" == reference_tokenizer.eos_token
    assert config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert loaded.convert_tokens_to_ids("<|im_end|>") == 2


def test_smollm2_converts_to_the_same_bytes_twice(
    smollm2_gguf: str, smollm2_ckpt: str, tmp_path: pathlib.Path
) -> None:
    again = convert("gguf", smollm2_gguf, str(tmp_path / "b"))
    assert tree_digest(pathlib.Path(smollm2_ckpt)) == tree_digest(pathlib.Path(again))


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2_gguf: str, smollm2_ckpt: str) -> None:
    reference = _transformers_state(smollm2_gguf)
    ckpt = open_checkpoint(smollm2_ckpt)
    seen = set()
    for name, tensor in ckpt.iter_tensors():
        seen.add(name)
        assert torch.equal(tensor, reference[name]), name
    assert seen == set(reference) - {"lm_head.weight"}  # tied: the embedding serves as the head
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])


def test_smollm2_bfloat16_is_the_float32_rounded(
    smollm2_gguf: str, smollm2_ckpt: str, tmp_path: pathlib.Path
) -> None:
    half = open_checkpoint(convert("gguf", smollm2_gguf, str(tmp_path / "bf16"), dtype="bfloat16"))
    full = dict(open_checkpoint(smollm2_ckpt).iter_tensors())
    for name, tensor in half.iter_tensors():
        assert tensor.dtype == torch.bfloat16
        np.testing.assert_array_equal(
            tensor.view(torch.int16).numpy(),
            full[name].to(torch.bfloat16).view(torch.int16).numpy(),
        )
