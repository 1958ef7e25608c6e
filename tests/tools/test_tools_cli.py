"""`saxutil convert` and `saxutil estimate`, run in-process through sax.cli.main.main(argv)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
from safetensors.numpy import save_file

from sax.cli.main import main

ARCH = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def hf_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A random Hugging Face Llama folder written with safetensors alone (no transformers)."""
    from servables.configs.llama import LlamaArchitecture

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ARCH))
    rng = np.random.default_rng(0)
    shapes = LlamaArchitecture.from_hf_config(ARCH).tensor_shapes()
    save_file(
        {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_convert_writes_a_checkpoint_with_a_progress_bar(
    hf_folder: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "ckpt"
    code, out, err = run(
        capsys,
        "convert",
        "--from",
        "hf",
        str(hf_folder),
        str(dst),
        "--dtype",
        "bfloat16",
        "--shard-size",
        "20KB",
    )
    assert code == 0, err
    assert out == f"wrote checkpoint {dst}/checkpoint_00000000\n"
    assert "converting hf" in err and "100%" in err  # tqdm on stderr
    state = sorted(p.name for p in (dst / "checkpoint_00000000/state").iterdir())
    assert len([n for n in state if n.endswith(".safetensors")]) > 1

    code, out, err = run(capsys, "convert", "-from=hf", "-quiet", "-json", str(hf_folder), str(dst))
    assert code == 1
    assert err.startswith("saxutil: convert: ALREADY_EXISTS: ") and err.count("\n") == 1

    code, out, err = run(
        capsys, "convert", "-from=hf", "-quiet", "-json", str(hf_folder), str(tmp_path / "b")
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == {"checkpoint": f"{tmp_path}/b/checkpoint_00000000"}


def test_convert_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    code, _, err = run(capsys, "convert", "--from", "onnx", "a", "b")
    assert code == 1 and "invalid choice: 'onnx'" in err and err.count("\n") == 1
    code, _, err = run(capsys, "convert", "--from", "gguf", str(tmp_path / "none.gguf"), "b")
    assert code == 1 and "INVALID_ARGUMENT" in err and "does not exist" in err
    code, _, err = run(capsys, "convert", "--from", "hf", str(tmp_path), "b", "--shard-size", "x")
    assert code == 1 and "INVALID_ARGUMENT" in err


def test_cli_does_not_import_torch(hf_folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    code = (
        "import sys; from sax.cli.main import main, build_parser; build_parser();"
        "assert 'torch' not in sys.modules and 'model_server' not in sys.modules;"
        f"rc = main(['convert', '--from', 'hf', '--quiet', {str(hf_folder)!r}, "
        f"{str(tmp_path / 'c')!r}]); print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stderr


def test_the_commands_are_entry_points_of_saxutil(capsys: pytest.CaptureFixture[str]) -> None:
    """sax never names tools: the installed distribution declares both commands (after a change
    of pyproject.toml, reinstall with `pip install -e .`)."""
    found = {ep.name: ep.value for ep in entry_points(group="saxutil.commands")}
    assert found["convert"] == "tools.cli:register_convert"
    assert found["estimate"] == "tools.cli:register_estimate"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "convert             convert a GGUF file" in out
    assert "estimate            estimate the memory" in out
    code, out, _ = run(capsys, "help", "estimate")
    assert code == 0 and "saxutil estimate --device-memory 24GiB /ckpt/smollm2" in out
    code, out, _ = run(capsys, "convert", "-h")
    assert code == 0 and "-shard-size SIZE" in out and "-sax_root PATH" in out


def test_estimate_a_checkpoint(
    hf_folder: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from servables.configs.llama import LlamaArchitecture
    from servables.memory import estimate_memory

    ckpt = str(tmp_path / "c")
    assert run(capsys, "convert", "--from", "hf", "--quiet", str(hf_folder), ckpt)[0] == 0
    code, out, err = run(capsys, "estimate", "--json", "--device-memory", "200KB", ckpt)
    assert code == 0, err
    report = json.loads(out)
    assert report["device_memory"] == 200_000
    rows = {r["dtype"]: r for r in report["rows"]}
    assert list(rows) == ["float32", "bfloat16", "int8", "int4"]
    shape = LlamaArchitecture.from_hf_config(ARCH)
    expected = estimate_memory(shape, dtype="float32", batch_size=1, seq_len=128)
    f32 = rows["float32"]
    assert (
        f32["weight_bytes"]
        == expected.weight_bytes
        == 4 * (96 * 32 + 2 * (3 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32)
    )  # q, o: 32 x 32; k, v (2 KV heads of 8): 16 x 32; tied: no LM head
    assert f32["largest_layer"] == "model.layers.0"
    assert f32["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert f32["kv_cache_bytes"] == f32["kv_bytes_per_token"] * 128
    assert f32["total_bytes"] == expected.total_bytes
    assert rows["bfloat16"]["weight_bytes"] * 2 == f32["weight_bytes"]
    assert rows["int8"]["weight_bytes"] < rows["bfloat16"]["weight_bytes"]
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"]
    assert [r["fits"] for r in rows.values()] == [False, True, True, True]

    code, out, _ = run(capsys, "estimate", "--batch-size", "4", "--seq-len", "10", ckpt)
    assert code == 0
    assert "KV cache (4 x 10)" in out and "Largest layer" in out and "| float32" in out


def test_estimate_a_registered_config(capsys: pytest.CaptureFixture[str]) -> None:
    from servables import registry

    config = registry.get("llama.SmolLM2_135M")
    code, out, err = run(capsys, "estimate", "-json", "llama.SmolLM2_135M")
    assert code == 0, err
    rows = {r["dtype"]: r for r in json.loads(out)["rows"]}
    assert rows["float32"]["total_bytes"] == config.memory_bytes()  # its dtype is float32
    assert rows["float32"]["weight_bytes"] == config.weight_bytes()
    assert rows["float32"]["batch_size"] == 16
    assert rows["float32"]["seq_len"] == 1024 + 256
    assert rows["float32"]["largest_layer"] == "model.embed_tokens"

    code, _, err = run(capsys, "estimate", "nope.Nothing")
    assert code == 1 and "NOT_FOUND" in err and "llama.SmolLM2_135M" in err
    code, _, err = run(capsys, "estimate", "test.TinyLM")
    assert code == 1 and "has no architecture" in err
