"""Hugging Face folder -> checkpoint: safetensors or .bin, sharded or not; exact round trip."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

from sax.errors import AlreadyExistsError, InvalidArgumentError
from servables.checkpoint import open_checkpoint
from tests.tools.convert.builders import (
    canonical_state,
    save_hf,
    save_hf_tokenizer,
    tree_digest,
)
from tools.convert import checkpoint_writer as common
from tools.convert import convert

LAYOUTS = [("safetensors", ""), ("safetensors", "60KB"), ("bin", ""), ("bin", "60KB")]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}-{p[1] or 'single'}")
def hf_folder(
    request: pytest.FixtureRequest, tiny_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    fmt, shard = request.param
    path = tmp_path_factory.mktemp("hf")
    save_hf(tiny_model, path, fmt=fmt, shard=shard)
    save_hf_tokenizer(path)
    return path


def test_hf_folder_layouts(hf_folder: pathlib.Path) -> None:
    names = {p.name for p in hf_folder.iterdir()}
    sharded = any("-of-" in n for n in names)
    assert ("model.safetensors.index.json" in names or "pytorch_model.bin.index.json" in names) == (
        sharded
    )


def test_round_trip_is_exact(
    hf_folder: pathlib.Path, tiny_model: Any, tmp_path: pathlib.Path
) -> None:
    path = convert("hf", str(hf_folder), str(tmp_path / "ckpt"))
    ckpt = open_checkpoint(path)
    expected = canonical_state(tiny_model)
    got = dict(ckpt.iter_tensors())
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name
    assert ckpt.config["num_key_value_heads"] == 4
    assert ckpt.config["rope_theta"] == 10000.0
    assert ckpt.config["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (pathlib.Path(ckpt.tokenizer_dir()) / name).read_bytes() == (
            hf_folder / name
        ).read_bytes()


def test_converting_twice_gives_the_same_bytes(
    hf_folder: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    for out in ("a", "b"):
        convert("hf", str(hf_folder), str(tmp_path / out), dtype="bfloat16", shard_size="40KB")
    digest = tree_digest(tmp_path / "a")
    assert digest == tree_digest(tmp_path / "b")
    assert sum(".safetensors" in name for name in digest) > 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion_equals_torch(
    tiny_model: Any, tmp_path: pathlib.Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "hf"
    save_hf(tiny_model.to(torch.bfloat16), src)  # a bfloat16 source
    tiny_model.to(torch.float32)
    monkeypatch.setattr(common, "CHUNK_BYTES", 1000)  # several chunks per tensor
    ckpt = open_checkpoint(convert("hf", str(src), str(tmp_path / "out"), dtype=dtype))
    target = getattr(torch, dtype)
    expected = canonical_state(tiny_model)
    for name, tensor in ckpt.iter_tensors():
        assert tensor.dtype == target
        assert torch.equal(tensor, expected[name].to(torch.bfloat16).to(target)), name


def test_default_dtype_follows_the_source(tiny_model: Any, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "hf"
    save_hf(tiny_model.to(torch.bfloat16), src, fmt="bin")
    tiny_model.to(torch.float32)
    ckpt = open_checkpoint(convert("hf", str(src), str(tmp_path / "out")))
    assert ckpt.config["torch_dtype"] == "bfloat16"
    assert {d for d, _ in ckpt.tensor_info().values()} == {"BF16"}


def test_tied_embeddings_have_no_lm_head(tiny_tied_model: Any, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "hf"
    save_hf(tiny_tied_model, src, fmt="bin")
    ckpt = open_checkpoint(convert("hf", str(src), str(tmp_path / "out")))
    assert "lm_head.weight" not in ckpt.tensor_names()
    assert ckpt.config["tie_word_embeddings"] is True
    expected = canonical_state(tiny_tied_model)
    assert all(torch.equal(t, expected[n]) for n, t in ckpt.iter_tensors())


def test_refusals(tiny_model: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidArgumentError, match="not a folder"):
        convert("hf", str(tmp_path / "nothing"), str(tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError, match=r"no config\.json"):
        convert("hf", str(empty), str(tmp_path / "out"))
    src = tmp_path / "hf"
    save_hf(tiny_model, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(InvalidArgumentError, match="model_type 'gpt2' is not supported"):
        convert("hf", str(src), str(tmp_path / "out"))
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(
        InvalidArgumentError,
        match=r"gate_proj\.weight has shape \[128, 64\], the config implies \[96, 64\]",
    ):
        convert("hf", str(src), str(tmp_path / "out"))
    (src / "config.json").write_text(json.dumps(config))
    convert("hf", str(src), str(tmp_path / "out"))
    with pytest.raises(AlreadyExistsError):
        convert("hf", str(src), str(tmp_path / "out"))
    with pytest.raises(InvalidArgumentError, match="unknown source format"):
        convert("onnx", str(src), str(tmp_path / "out2"))


def test_rope_theta_from_transformers5_rope_parameters(
    tiny_model: Any, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "hf"
    save_hf(tiny_model, src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    (src / "config.json").write_text(json.dumps(config))
    ckpt = open_checkpoint(convert("hf", str(src), str(tmp_path / "out")))
    assert ckpt.config["rope_theta"] == 500000.0


def test_released_pages_read_back_from_the_file(tmp_path: pathlib.Path) -> None:
    from tools.convert import torch_io

    values = torch.randn(512, 1024)
    torch.save({"w": values}, tmp_path / "w.bin")
    loaded = torch_io.load(str(tmp_path / "w.bin"))
    assert loaded.mmapped
    rows = loaded.tensors["w"][100:400]
    assert torch.equal(rows, values[100:400])
    loaded.release(rows)
    assert torch.equal(loaded.tensors["w"], values)  # paged in again from the file
