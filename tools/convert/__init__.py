"""Checkpoint converters: GGUF, Hugging Face folders and Meta Llama files -> the checkpoint
layout of `servables.checkpoint`. Each format's module is imported only when used."""

from __future__ import annotations

import importlib

from sax.errors import InvalidArgumentError
from tools.convert.checkpoint_writer import (
    DEFAULT_SHARD_SIZE,
    Progress,
    SourceModel,
    write_checkpoint,
)

# --from value -> the module whose read_model(src) reads that format.
FORMATS = {
    "gguf": "tools.convert.gguf",
    "hf": "tools.convert.hf",
    "meta": "tools.convert.meta",
}


def read_model(source_format: str, src: str) -> SourceModel:
    """Reads src in source_format ("gguf", "hf" or "meta"); tensors stay lazy."""
    try:
        module = FORMATS[source_format]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown source format {source_format!r}; use one of {', '.join(FORMATS)}"
        ) from None
    model: SourceModel = importlib.import_module(module).read_model(src)
    return model


def convert(
    source_format: str,
    src: str,
    dst: str,
    *,
    dtype: str | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
) -> str:
    """Converts src (in source_format) into a checkpoint under dst and returns the checkpoint
    folder; dtype defaults to the source's own (float32 for GGUF, bfloat16 for Meta files, the
    config's torch_dtype for HF folders)."""
    model = read_model(source_format, src)
    return write_checkpoint(
        dst,
        config=model.config,
        tensors=model.tensors,
        tokenizer_files=model.tokenizer_files,
        dtype=dtype or model.dtype,
        shard_size=shard_size,
        progress=progress,
    )
