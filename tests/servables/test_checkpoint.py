"""The checkpoint reader: committed checkpoints stream their tensors; anything missing is a
FAILED_PRECONDITION naming the file. Local folders and gs:// (on the storage emulator)."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import struct
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from sax.errors import FailedPreconditionError
from servables.checkpoint import (
    open_checkpoint,
    open_files,
    read_safetensors,
    read_safetensors_header,
)
from tests.conftest import EMULATOR_ENV, GcsEmulator
from tools.convert.checkpoint_writer import TensorSource, cast, write_checkpoint

CONFIG = {"hidden_size": 4, "num_hidden_layers": 2}


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 4), dtype=np.float32),
        "model.layers.0.w": rng.standard_normal((8, 4), dtype=np.float32),
        "model.layers.1.w": rng.standard_normal((8, 4), dtype=np.float32),
        "model.norm.weight": rng.standard_normal((4,), dtype=np.float32),
    }


def _source(name: str, values: np.ndarray) -> TensorSource:
    def read(dtype: str) -> Iterator[np.ndarray]:
        yield cast(values.reshape(-1), "float32", dtype)

    return TensorSource(name=name, shape=tuple(values.shape), read=read)


def _write(dst: str, dtype: str = "float32") -> str:
    return write_checkpoint(
        dst,
        config=CONFIG,
        tensors=[_source(n, v) for n, v in _tensors().items()],
        tokenizer_files={"tokenizer.json": b'{"x": 1}', "tokenizer_config.json": b"{}"},
        dtype=dtype,
        shard_size=200,  # three shards
    )


@pytest.fixture
def ckpt_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(_write(str(tmp_path / "model")))


def test_open_and_stream(ckpt_dir: pathlib.Path) -> None:
    for path in (ckpt_dir, ckpt_dir.parent, f"{ckpt_dir}/"):
        ckpt = open_checkpoint(str(path))
        assert ckpt.path == str(ckpt_dir)
    assert ckpt.config == {**CONFIG, "torch_dtype": "float32"}
    assert len(ckpt.shard_files()) == 3
    expected = _tensors()
    assert ckpt.tensor_names() == list(expected)
    got = list(ckpt.iter_tensors())
    assert [n for n, _ in got] == list(expected)
    for name, tensor in got:
        assert torch.equal(tensor, torch.from_numpy(expected[name]))
    for name, tensor in ckpt.iter_tensors(device="cpu", dtype=torch.bfloat16):
        assert torch.equal(tensor, torch.from_numpy(expected[name]).to(torch.bfloat16))
    assert ckpt.tensor_info()["model.layers.1.w"] == ("F32", (8, 4))
    assert pathlib.Path(ckpt.tokenizer_dir(), "tokenizer.json").read_bytes() == b'{"x": 1}'


def test_highest_committed_checkpoint_wins(ckpt_dir: pathlib.Path) -> None:
    shutil.copytree(ckpt_dir, ckpt_dir.parent / "checkpoint_00000002")
    newest = ckpt_dir.parent / "checkpoint_00000003"
    shutil.copytree(ckpt_dir, newest)
    (newest / "commit_success.txt").unlink()  # still being written
    assert open_checkpoint(str(ckpt_dir.parent)).path.endswith("checkpoint_00000002")


@pytest.mark.parametrize(
    "missing",
    [
        "commit_success.txt",
        "metadata/commit_success.txt",
        "metadata/config.json",
        "state/commit_success.txt",
        "state/model.safetensors.index.json",
        "state/model-00002-of-00003.safetensors",
    ],
)
def test_missing_file_is_failed_precondition_naming_it(
    ckpt_dir: pathlib.Path, missing: str
) -> None:
    (ckpt_dir / missing).unlink()
    with pytest.raises(FailedPreconditionError, match=re.escape(f"{ckpt_dir}/{missing} ")):
        open_checkpoint(str(ckpt_dir))
    if missing == "commit_success.txt":  # through the parent: no committed checkpoint
        with pytest.raises(FailedPreconditionError, match=re.escape(f"{ckpt_dir}/{missing}")):
            open_checkpoint(str(ckpt_dir.parent))


def test_other_damage(ckpt_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with pytest.raises(FailedPreconditionError, match="does not exist or is empty"):
        open_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FailedPreconditionError, match="no checkpoint_NNNNNNNN folder"):
        open_checkpoint(str(tmp_path / "other"))

    index_path = ckpt_dir / "state/model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    ckpt = open_checkpoint(str(ckpt_dir))
    with pytest.raises(FailedPreconditionError, match=r"has no tensor 'model\.extra'"):
        list(ckpt.iter_tensors())
    index_path.write_text("{not json")
    with pytest.raises(FailedPreconditionError, match="not valid JSON"):
        open_checkpoint(str(ckpt_dir))
    shutil.rmtree(ckpt_dir / "tokenizer")
    index_path.write_text(json.dumps(index))
    with pytest.raises(FailedPreconditionError, match=r"tokenizer/tokenizer\.json"):
        open_checkpoint(str(ckpt_dir)).tokenizer_dir()


def test_gcs_checkpoint(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATOR_ENV, gcs_emulator.host)
    root = gcs_emulator.root(f"ckpt-{uuid.uuid4().hex[:8]}")
    path = _write(root, dtype="bfloat16")
    assert path == f"{root}/checkpoint_00000000"
    ckpt = open_checkpoint(root)
    assert ckpt.path == path
    expected = _tensors()
    got = dict(ckpt.iter_tensors(dtype=torch.float32))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, torch.from_numpy(expected[name]).to(torch.bfloat16).float())
    assert ckpt.tensor_info()["model.embed_tokens.weight"] == ("BF16", (16, 4))
    folder = pathlib.Path(ckpt.tokenizer_dir())
    assert (folder / "tokenizer.json").read_bytes() == b'{"x": 1}'
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    open_files(path).delete("state/commit_success.txt")  # type: ignore[attr-defined]
    with pytest.raises(FailedPreconditionError, match=re.escape(f"{path}/state/commit_success")):
        open_checkpoint(root)


def _json_header(path: pathlib.Path) -> dict[str, object]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return dict(json.loads(raw[8 : 8 + size]))


def test_safetensors_headers_read_with_the_library(ckpt_dir: pathlib.Path) -> None:
    files = open_files(str(ckpt_dir))
    for shard in open_checkpoint(str(ckpt_dir)).shard_files():
        path = ckpt_dir / "state" / shard
        assert read_safetensors_header(files, f"state/{shard}") == _json_header(path)
        header = read_safetensors(str(path))
        assert header.metadata == {"format": "pt"}
        raw = path.read_bytes()
        base = 8 + struct.unpack("<Q", raw[:8])[0]
        for name, t in header.tensors.items():
            values = np.frombuffer(raw[t.begin : t.end], dtype=np.float32).reshape(t.shape)
            np.testing.assert_array_equal(values, _tensors()[name])
            assert t.begin >= base


def test_damaged_shard_header_is_failed_precondition(ckpt_dir: pathlib.Path) -> None:
    shard = ckpt_dir / "state" / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])  # cut short: the header no longer fits the file
    ckpt = open_checkpoint(str(ckpt_dir))
    with pytest.raises(FailedPreconditionError, match=r"00003\.safetensors has a bad safetensors"):
        ckpt.tensor_info()
    shard.write_bytes(b"abc")
    with pytest.raises(FailedPreconditionError, match="bad safetensors header"):
        read_safetensors_header(open_files(str(ckpt_dir)), "state/" + shard.name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_onto_the_gpu(ckpt_dir: pathlib.Path) -> None:
    ckpt = open_checkpoint(str(ckpt_dir))
    expected = _tensors()
    for name, tensor in ckpt.iter_tensors(device=torch.device("cuda", 0), dtype=torch.bfloat16):
        assert tensor.device.type == "cuda" and tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.cpu(), torch.from_numpy(expected[name]).to(torch.bfloat16))
