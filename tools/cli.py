"""saxutil commands that prepare models: convert (GGUF / Hugging Face / Meta -> checkpoint) and
estimate (memory per dtype, after Accelerate's `estimate-memory`).

saxutil finds them through the `saxutil.commands` entry points of pyproject.toml, which name
`register_convert` and `register_estimate`. This module imports only the standard library and
sax.cli.common at module level: the converters and servables (numpy, torch, gguf, safetensors)
are imported inside the commands, never at saxutil's start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from sax.cli.common import flag

if TYPE_CHECKING:
    from sax.cli.main import CommandRegistry

# Rows of the estimate: (label, compute dtype, quantization).
ESTIMATE_ROWS = (("float32", "float32", "none"), ("bfloat16", "bfloat16", "none"))
ESTIMATE_ROWS += (("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4"))
DEFAULT_DEVICE_MEMORY = "16GiB"


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


class _Bar:
    """`Progress` as a tqdm bar over bytes written, on stderr."""

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._bar: Any = None

    def start(self, total_bytes: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self._desc,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def register_convert(commands: CommandRegistry) -> None:
    """The `saxutil.commands` entry point `convert`."""
    p = commands.add(
        "convert",
        cmd_convert,
        "convert a GGUF file, Hugging Face folder or Meta Llama folder into a checkpoint",
        "examples:\n  saxutil convert --from gguf SmolLM2-135M-Instruct.Q4_1.gguf /ckpt/smollm2\n"
        "  saxutil convert --from hf --dtype bfloat16 ./Llama-2-7b-hf gs://bucket/llama7b\n"
        "  saxutil convert --from meta --shard-size 5GB ./llama-2-70b /ckpt/llama70b\n"
        "the checkpoint goes to DST/checkpoint_00000000",
    )
    p.add_argument(
        "-from",
        "--from",
        dest="source_format",
        required=True,
        choices=("gguf", "hf", "meta"),
        help="source format: a GGUF file, a Hugging Face folder or a Meta Llama folder",
    )
    p.add_argument("src", help="GGUF file, Hugging Face folder or Meta Llama folder")
    p.add_argument("dst", help="output folder or gs:// URL")
    flag(p, "dtype", choices=("float32", "bfloat16", "float16"), default=None, help="output dtype")
    p.add_argument(
        "-shard-size",
        "--shard-size",
        "-shard_size",
        "--shard_size",
        dest="shard_size",
        default="2GB",
        metavar="SIZE",
        help="largest shard file, e.g. 2GB, 500MB (default: 2GB)",
    )
    flag(p, "quiet", action="store_true", help="no progress bar")
    flag(p, "json", action="store_true", help="print JSON")


def register_estimate(commands: CommandRegistry) -> None:
    """The `saxutil.commands` entry point `estimate`."""
    p = commands.add(
        "estimate",
        cmd_estimate,
        "estimate the memory of a config or checkpoint per dtype",
        "examples:\n  saxutil estimate llama.LLaMA7BFP16\n"
        "  saxutil estimate --device-memory 24GiB /ckpt/smollm2\n"
        "  saxutil estimate --json --batch-size 8 --seq-len 2048 gs://bucket/llama7b",
    )
    p.add_argument("target", help="registered config name (llama.LLaMA7BFP16) or checkpoint path")
    for name, kind, default, metavar, text in (
        ("device-memory", str, "16GiB", "SIZE", "memory to compare with (default: 16GiB)"),
        ("batch-size", int, None, "N", "sequences in the KV cache (default: largest batch, or 1)"),
        ("seq-len", int, None, "N", "positions per sequence (default: prompt + decode steps)"),
    ):
        flags = [
            f"-{name}",
            f"--{name}",
            f"-{name.replace('-', '_')}",
            f"--{name.replace('-', '_')}",
        ]
        dest = name.replace("-", "_")
        p.add_argument(*flags, dest=dest, type=kind, default=default, metavar=metavar, help=text)
    flag(p, "json", action="store_true", help="print JSON instead of a table")


def _missing_extra(command: str, err: ModuleNotFoundError) -> NoReturn:
    """Raises the error of a command whose optional dependencies (numpy, torch, gguf, ...) are
    not installed; a missing module of this project itself is raised as it is."""
    from sax.errors import FailedPreconditionError

    if (err.name or "").split(".")[0] in ("sax", "servables", "tools"):
        raise err
    raise FailedPreconditionError(
        f"saxutil {command} needs the Python package {err.name!r}, which is not installed; "
        "install the convert extra: pip install 'sax-cluster[convert]'"
    ) from err


def cmd_convert(args: argparse.Namespace) -> int:
    """convert --from gguf|hf|meta SRC DST [--dtype D] [--shard-size S]"""
    bar = None if args.quiet else _Bar(f"converting {os.path.basename(args.src.rstrip('/'))}")
    try:
        from tools.convert import convert  # numpy and the format's readers

        path = convert(
            args.source_format,
            args.src,
            args.dst,
            dtype=args.dtype,
            shard_size=args.shard_size,
            progress=bar,
        )
    except ModuleNotFoundError as e:
        _missing_extra("convert", e)
    finally:
        if bar is not None:
            bar.close()
    _out(json.dumps({"checkpoint": path}) if args.json else f"wrote checkpoint {path}")
    return 0


def human_bytes(n: int) -> str:
    """1536 -> "1.50 KiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _is_checkpoint_path(target: str) -> bool:
    return "/" in target or target.startswith(".") or os.path.exists(target)


def estimates(
    target: str, batch_size: int | None = None, seq_len: int | None = None
) -> tuple[str, list[Any]]:
    """(what was estimated, [MemoryEstimate per ESTIMATE_ROWS]) for a registered config name or
    a checkpoint path. A checkpoint has no serving shape: batch_size defaults to 1 and seq_len to
    the model's max_position_embeddings."""
    from servables import families
    from servables.memory import estimate_config, estimate_memory

    if not _is_checkpoint_path(target):
        from servables import registry

        config = registry.get(target)
        rows = [
            estimate_config(
                config, dtype=dt, quantization=q, batch_size=batch_size, seq_len=seq_len
            )
            for _, dt, q in ESTIMATE_ROWS
        ]
        return f"config {target}", rows
    from servables.checkpoint import open_checkpoint

    ckpt = open_checkpoint(target)
    shape = families.architecture(ckpt.config, ckpt.path)
    shapes = {name: dims for name, (_, dims) in ckpt.tensor_info().items()}
    seq = seq_len if seq_len is not None else shape.max_seq_len
    rows = [
        estimate_memory(
            shape,
            dtype=dt,
            quantization=q,
            batch_size=batch_size or 1,
            seq_len=seq,
            tensor_shapes=shapes,
        )
        for _, dt, q in ESTIMATE_ROWS
    ]
    return f"checkpoint {ckpt.path}", rows


def cmd_estimate(args: argparse.Namespace) -> int:
    """estimate <config name or checkpoint path> [--device-memory 16GiB] [--json]"""
    try:
        from tools.convert.checkpoint_writer import parse_size
    except ModuleNotFoundError as e:
        _missing_extra("estimate", e)
    from sax.cli.table import format_table

    device = parse_size(args.device_memory)
    what, rows = estimates(args.target, args.batch_size, args.seq_len)
    labels = [label for label, _, _ in ESTIMATE_ROWS]
    if args.json:
        out = {
            "target": what,
            "device_memory": device,
            "rows": [
                {
                    "dtype": label,
                    "compute_dtype": e.dtype,
                    "quantization": e.quantization,
                    "largest_layer": e.largest_layer,
                    "largest_layer_bytes": e.largest_layer_bytes,
                    "weight_bytes": e.weight_bytes,
                    "kv_bytes_per_token": e.kv_bytes_per_token,
                    "batch_size": e.batch_size,
                    "seq_len": e.seq_len,
                    "kv_cache_bytes": e.kv_cache_bytes,
                    "activation_bytes": e.activation_bytes,
                    "total_bytes": e.total_bytes,
                    "fits": e.fits(device),
                }
                for label, e in zip(labels, rows, strict=True)
            ],
        }
        _out(json.dumps(out, indent=2))
        return 0
    first = rows[0]
    kv_title = f"KV cache ({first.batch_size} x {first.seq_len})"
    headers = ["dtype", "Largest layer", "Weights", "KV / token", kv_title, "Activations"]
    headers += ["Total", f"Fits {human_bytes(device)}"]
    table = [
        [
            label,
            human_bytes(e.largest_layer_bytes),
            human_bytes(e.weight_bytes),
            human_bytes(e.kv_bytes_per_token),
            human_bytes(e.kv_cache_bytes),
            human_bytes(e.activation_bytes),
            human_bytes(e.total_bytes),
            "yes" if e.fits(device) else "no",
        ]
        for label, e in zip(labels, rows, strict=True)
    ]
    _out(f"Memory of one replica of {what} (largest layer: {first.largest_layer}):")
    _out(format_table(headers, table))
    return 0
