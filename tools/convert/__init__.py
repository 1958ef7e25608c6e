"""Checkpoint converters: GGUF, Hugging Face folders and Meta Llama files -> the checkpoint
layout of `servables.checkpoint`. Each format's module is imported only when used."""

from __future__ import annotations

import importlib
from typing import Any

from sax.errors import InvalidArgumentError

# --from value -> "module:function".
FORMATS = {
    "gguf": "tools.convert.gguf:convert_gguf",
    "hf": "tools.convert.hf:convert_hf",
    "meta": "tools.convert.meta:convert_meta",
}


def convert(source_format: str, src: str, dst: str, **kwargs: Any) -> str:
    """Converts src (in source_format: "gguf", "hf" or "meta") into a checkpoint under dst and
    returns the checkpoint folder. kwargs: dtype, shard_size, progress (see each converter)."""
    try:
        target = FORMATS[source_format]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown source format {source_format!r}; use one of {', '.join(FORMATS)}"
        ) from None
    module, func = target.split(":")
    return str(getattr(importlib.import_module(module), func)(src, dst, **kwargs))
