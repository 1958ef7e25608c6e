"""The pieces every converter shares: sizes, dtype casts, shard plans and the streaming writer."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sax.errors import AlreadyExistsError, InvalidArgumentError
from servables.checkpoint import open_checkpoint
from tests.tools.convert.builders import tree_digest
from tools.convert import checkpoint_writer as common
from tools.convert.checkpoint_writer import (
    TensorSource,
    cast,
    parse_size,
    plan_shards,
    row_chunks,
    write_checkpoint,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("64KiB", 65536),
        ("4096", 4096),
        ("10 mb", 10**7),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2XB", "-1GB", "0", "GB"])
def test_parse_size_refuses_bad_values(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_size(text)


def test_bfloat16_cast_matches_torch_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(10_000, generator=gen) * 1e3
    special = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0 + 2**-8, 1.0 + 3 * 2**-8]
    )  # the last two are rounding ties (to even: down, then up)
    values = torch.cat([values, special, torch.tensor([3.4e38, 1e-40, -1e-45])])
    ours = cast(values.numpy(), "float32", "bfloat16")
    theirs = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert ours.dtype == np.uint16
    nan = np.isnan(values.numpy())
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    # torch writes NaN as 0x7FC0 or 0xFFFF depending on its code path; any NaN will do
    back = cast(ours, "bfloat16", "float32")
    assert np.isnan(back[nan]).all()
    np.testing.assert_array_equal(back, values.to(torch.bfloat16).float().numpy())
    half = cast(ours, "bfloat16", "float16")
    np.testing.assert_array_equal(half, values.to(torch.bfloat16).to(torch.float16).numpy())


def test_cast_to_same_dtype_is_no_copy() -> None:
    a = np.arange(4, dtype=np.float32)
    assert cast(a, "float32", "float32") is a


def test_row_chunks_cover_rows_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "CHUNK_BYTES", 1000)
    chunks = list(row_chunks(50, 64, align=4))  # 15 rows fit, aligned down to 12
    assert chunks[0] == (0, 12)
    assert chunks[-1][1] == 50
    assert all(b - a == 12 for a, b in chunks[:-1])
    assert list(row_chunks(3, 10**9, align=2)) == [(0, 2), (2, 3)]


def _source(name: str, values: np.ndarray) -> TensorSource:
    def read(dtype: str) -> Iterator[np.ndarray]:
        for row in values.reshape(values.shape[0], -1):  # one row per chunk
            yield cast(row, "float32", dtype)

    return TensorSource(name=name, shape=tuple(values.shape), read=read)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.layers.10.w": rng.standard_normal((8, 4), dtype=np.float32),
        "model.layers.2.w": rng.standard_normal((16, 4), dtype=np.float32),
        "model.embed_tokens.weight": rng.standard_normal((32, 4), dtype=np.float32),
        "model.norm.weight": rng.standard_normal((4,), dtype=np.float32),
    }


def test_plan_shards_in_natural_order_within_the_limit() -> None:
    sources = [_source(n, v) for n, v in _tensors().items()]
    shards = plan_shards(sources, "float32", shard_size=300)
    names = [[t.name for t in shard] for shard in shards]
    assert names == [
        ["model.embed_tokens.weight"],  # 512 bytes: larger than the limit, alone
        ["model.layers.2.w"],  # 256
        ["model.layers.10.w", "model.norm.weight"],  # 128 + 16
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_written_checkpoint_reads_back(tmp_path: pathlib.Path, dtype: str) -> None:
    tensors = _tensors()
    path = write_checkpoint(
        str(tmp_path / "out"),
        config={"hidden_size": 4},
        tensors=[_source(n, v) for n, v in tensors.items()],
        tokenizer_files={"tokenizer.json": b"{}"},
        dtype=dtype,
        shard_size=300 if dtype == "float32" else 150,  # three shards
    )
    root = pathlib.Path(path)
    assert root.name == "checkpoint_00000000"
    state = sorted(p.name for p in (root / "state").iterdir())
    assert state == [
        "commit_success.txt",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((root / "state/model.safetensors.index.json").read_text())
    torch_dtype = getattr(torch, dtype)
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(root / "state" / shard))  # the reference safetensors reader
    assert set(loaded) == set(tensors)
    for name, values in tensors.items():
        assert loaded[name].dtype == torch_dtype
        assert torch.equal(loaded[name], torch.from_numpy(values).to(torch_dtype)), name
    assert index["metadata"]["total_size"] == sum(v.size for v in tensors.values()) * (
        4 if dtype == "float32" else 2
    )
    config = json.loads((root / "metadata/config.json").read_text())
    assert config == {"hidden_size": 4, "torch_dtype": dtype}
    assert (root / "tokenizer/tokenizer.json").read_bytes() == b"{}"
    for marker in ("commit_success.txt", "state/commit_success.txt", "metadata/commit_success.txt"):
        assert (root / marker).is_file()
    ckpt = open_checkpoint(str(tmp_path / "out"))
    assert ckpt.tensor_names() == [
        "model.embed_tokens.weight",
        "model.layers.2.w",
        "model.layers.10.w",
        "model.norm.weight",
    ]


def test_same_input_gives_same_bytes(tmp_path: pathlib.Path) -> None:
    for out in ("a", "b"):
        write_checkpoint(
            str(tmp_path / out),
            config={"x": 1},
            tensors=[_source(n, v) for n, v in _tensors().items()],
            tokenizer_files={},
            dtype="bfloat16",
            shard_size=200,
        )
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_refuses_a_non_empty_destination(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "out" / "checkpoint_00000000"
    target.mkdir(parents=True)
    (target / "leftover").write_text("x")
    with pytest.raises(AlreadyExistsError, match="remove it"):
        write_checkpoint(
            str(tmp_path / "out"),
            config={},
            tensors=[_source(n, v) for n, v in _tensors().items()],
            tokenizer_files={},
            dtype="float32",
        )


def test_a_short_source_fails_without_committing(tmp_path: pathlib.Path) -> None:
    def read(dtype: str) -> Iterator[np.ndarray]:
        yield np.zeros(3, dtype=np.float32)

    with pytest.raises(Exception, match="expected 16"):
        write_checkpoint(
            str(tmp_path / "out"),
            config={},
            tensors=[TensorSource("w", (4,), read)],
            tokenizer_files={},
            dtype="float32",
        )
    root = tmp_path / "out" / "checkpoint_00000000"
    assert not (root / "commit_success.txt").exists()
    assert not list((root / "state").glob("*.safetensors"))
