"""Hugging Face folder (Llama or BLOOM) -> checkpoint: config.json plus safetensors (sharded
with an index, or single) or pytorch_model*.bin, and the tokenizer files copied.

The config.json's `model_type` picks the family (`servables.families`); tensors keep
transformers' names (BLOOM's original releases, saved without the `transformer.` prefix, get
it). A BLOOM tokenizer without a chat template gets Firefly's (`FIREFLY_CHAT_TEMPLATE`), the
family's chat format.

safetensors files are read without torch or mmap: the header (read with the `safetensors`
library, `servables.checkpoint.read_safetensors`) gives each tensor's bytes, and rows are read
with `os.pread` in chunks and cast with numpy. .bin files are loaded with
`torch.load(mmap=True, weights_only=True)` and read by row slices, giving file pages back after
each chunk.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from sax.errors import InvalidArgumentError
from servables import families
from servables.chat_template import TOKENIZER_CONFIG
from servables.checkpoint import read_safetensors
from servables.configs.bloom import FIREFLY_CHAT_TEMPLATE
from tools.convert import torch_io
from tools.convert.checkpoint_writer import (
    DTYPES,
    SourceModel,
    TensorSource,
    cast,
    check_tensors,
    json_bytes,
    row_chunks,
)
from tools.convert.tokenizer_files import hf_tokenizer_files

logger = logging.getLogger(__name__)

MODEL_TYPES = families.MODEL_TYPES
# safetensors dtype code -> (our dtype name, numpy dtype of its bits).
_ST_DTYPES = {"F32": ("float32", np.float32), "F16": ("float16", np.float16)}
_ST_DTYPES["BF16"] = ("bfloat16", np.uint16)
# Unindexed weight files, by preference.
_WEIGHT_PATTERNS = ("model.safetensors", "pytorch_model.bin", "*.safetensors", "pytorch_model*.bin")


def _is_skipped(name: str, tied: bool) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def _safetensors_sources(path: str) -> tuple[list[TensorSource], set[str]]:
    """TensorSources of a safetensors file, and the source dtypes seen."""
    try:
        header = read_safetensors(path)
    except ValueError as e:
        raise InvalidArgumentError(f"{path} is not a valid safetensors file ({e})") from e
    sources, dtypes = [], set()
    for name, t in sorted(header.tensors.items()):
        if t.dtype not in _ST_DTYPES:
            sources.append(_unsupported(name, t.shape, f"{t.dtype} tensor in {path}"))
            continue
        src_dtype, np_dtype = _ST_DTYPES[t.dtype]
        dtypes.add(src_dtype)
        sources.append(_st_source(path, name, t.shape, t.begin, t.end, src_dtype, np_dtype))
    return sources, dtypes


def _unsupported(name: str, shape: tuple[int, ...], what: str) -> TensorSource:
    def read(dtype: str) -> Iterator[np.ndarray]:
        raise InvalidArgumentError(f"cannot convert {what} ({name}); only float tensors convert")

    return TensorSource(name=name, shape=shape, read=read)


def _st_source(
    path: str,
    name: str,
    shape: tuple[int, ...],
    begin: int,
    end: int,
    src_dtype: str,
    np_dtype: Any,
) -> TensorSource:
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if shape else 1
    itemsize = np.dtype(np_dtype).itemsize
    if end - begin != rows * cols * itemsize:
        raise InvalidArgumentError(f"{path}: tensor {name} has {end - begin} bytes for {shape}")

    def read(dtype: str) -> Iterator[np.ndarray]:
        fd = os.open(path, os.O_RDONLY)
        try:
            for a, b in row_chunks(rows, cols * 4):
                size = (b - a) * cols * itemsize
                buf = os.pread(fd, size, begin + a * cols * itemsize)
                if len(buf) != size:
                    raise InvalidArgumentError(f"{path} is truncated inside tensor {name}")
                yield cast(np.frombuffer(buf, dtype=np_dtype), src_dtype, dtype)
        finally:
            os.close(fd)

    return TensorSource(name=name, shape=shape, read=read)


def _torch_sources(path: str) -> tuple[list[TensorSource], set[str]]:
    loaded = torch_io.load(path)
    sources, dtypes = [], set()
    for name, tensor in sorted(loaded.tensors.items()):
        shape = tuple(int(d) for d in tensor.shape)
        src = torch_io.dtype_name(tensor.dtype)
        if src is None:
            sources.append(_unsupported(name, shape, f"{tensor.dtype} tensor in {path}"))
            continue
        dtypes.add(src)
        sources.append(_torch_source(loaded, name, shape))
    return sources, dtypes


def _torch_source(loaded: torch_io.TorchFile, name: str, shape: tuple[int, ...]) -> TensorSource:
    def read(dtype: str) -> Iterator[np.ndarray]:
        tensor = loaded.tensors[name]
        flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
        for a, b in row_chunks(flat.shape[0], flat.shape[1] * 4):
            rows = flat[a:b]
            yield torch_io.to_numpy(rows, dtype).reshape(-1)
            loaded.release(rows)

    return TensorSource(name=name, shape=shape, read=read)


def _weight_files(src: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(src, index)
        if os.path.isfile(path):
            with open(path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(src, n))]
            if missing:
                raise InvalidArgumentError(f"{src}: {index} lists missing files {missing}")
            return [os.path.join(src, n) for n in files]
    for pattern in _WEIGHT_PATTERNS:
        found = sorted(glob.glob(os.path.join(src, pattern)))
        if found:
            return found
    raise InvalidArgumentError(
        f"{src} has no weights: expected model.safetensors (+ index) or pytorch_model*.bin"
    )


def read_hf_config(src: str) -> dict[str, Any]:
    """The folder's config.json with the architecture's defaults filled in; INVALID_ARGUMENT
    unless its model_type is one that converts (`MODEL_TYPES`)."""
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise InvalidArgumentError(
            f"{src} has no config.json; point at a Hugging Face model folder"
        )
    with open(path) as f:
        config = json.load(f)
    if not config.get("model_type"):
        raise InvalidArgumentError(
            f"{path} names no model_type; supported: {', '.join(MODEL_TYPES)}"
        )
    family = families.model_type(config, path)
    if family == "llama":
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            logger.warning("%s: RoPE type %r is not converted; plain RoPE applies", path, rope)
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]  # transformers 5 keeps it there
        config.setdefault("hidden_act", "silu")
    # The architecture keys it lacks, with transformers' defaults.
    return {**families.architecture(config, path).to_hf_config(), **config}


def _canonical(family: str, source: TensorSource) -> TensorSource:
    """The tensor under its transformers name (BLOOM's original releases lack `transformer.`)."""
    if family == "bloom" and not source.name.startswith(("transformer.", "lm_head.")):
        return dataclasses.replace(source, name="transformer." + source.name)
    return source


def _family_tokenizer(family: str, files: dict[str, bytes]) -> dict[str, bytes]:
    """The tokenizer files with the family's chat template where they have none (BLOOM:
    Firefly's)."""
    if family != "bloom" or "chat_template.jinja" in files:
        return files
    config = json.loads(files.get(TOKENIZER_CONFIG, b"{}"))
    if config.get("chat_template"):
        return files
    config["chat_template"] = FIREFLY_CHAT_TEMPLATE
    logger.info("the tokenizer has no chat template; it takes Firefly's, BLOOM's chat format")
    return {**files, TOKENIZER_CONFIG: json_bytes(config)}


def read_model(src: str) -> SourceModel:
    """Reads a Hugging Face folder of a family that converts; its dtype is the config's
    torch_dtype (else the weights' dtype, else float32)."""
    if not os.path.isdir(src):
        raise InvalidArgumentError(f"{src} is not a folder; point at a Hugging Face model folder")
    config = read_hf_config(src)
    family = families.model_type(config, src)
    arch = families.architecture(config, src)
    tied = bool(config.get("tie_word_embeddings", arch.tie_embeddings))
    sources: list[TensorSource] = []
    seen: set[str] = set()
    for path in _weight_files(src):
        found, dtypes = (_safetensors_sources if path.endswith(".safetensors") else _torch_sources)(
            path
        )
        found = [_canonical(family, t) for t in found]
        sources += [t for t in found if not _is_skipped(t.name, tied)]
        seen |= dtypes
    check_tensors(sources, arch.tensor_shapes(), src, family=family)
    declared = config.get("torch_dtype") or config.get("dtype")
    dtype = declared if declared in DTYPES else (seen.pop() if len(seen) == 1 else "float32")
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        config.pop(key, None)
    tokenizer = _family_tokenizer(family, hf_tokenizer_files(src))
    return SourceModel(config=config, tensors=sources, tokenizer_files=tokenizer, dtype=dtype)
