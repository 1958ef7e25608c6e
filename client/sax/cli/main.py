"""`saxutil`: manage cells and models, and query them, from the command line.

Subcommands are argparse subparsers; their code lives in sax.cli.admin_cmds and sax.cli.lm_cmds,
imported only when the command runs. Every flag takes both spellings, `-flag` and `--flag`
(Saxml's Go flags use one dash: `-replicas=2`, `-extra=temperature:0.2`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from sax.cli.common import UsageError, parse_duration

_EXAMPLES = """\
examples:
  saxutil --sax_root=/tmp/sax-root create /sax/test
  saxutil ls /sax
  saxutil publish /sax/test/tiny test.TinyLM None 1
  saxutil ls /sax/test/tiny
  saxutil lm.generate -extra=temperature:0.2 /sax/test/tiny "Q: Hello? A:"
  saxutil update -replicas=2 /sax/test/tiny
  saxutil unpublish /sax/test/tiny

sax_root comes from --sax_root or $SAX_ROOT. Set SAX_DEBUG=1 to print tracebacks on errors.
"""

# name -> (handler "module:function", one-line help, usage epilog with examples)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "create": (
        "sax.cli.admin_cmds:cmd_create",
        "create a cell under sax_root",
        "example:\n  saxutil create /sax/test\n  saxutil create /sax/test '' acl/all",
    ),
    "ls": (
        "sax.cli.admin_cmds:cmd_ls",
        "list cells, the models of a cell, or one model",
        "examples:\n  saxutil ls /sax\n  saxutil ls /sax/test\n  saxutil ls --json /sax/test/tiny",
    ),
    "publish": (
        "sax.cli.admin_cmds:cmd_publish",
        "publish a model",
        "examples:\n  saxutil publish /sax/test/tiny test.TinyLM None 1\n"
        "  saxutil publish /sax/test/lm llama.SmolLM2_135M /ckpt/smollm2 2 BATCH_SIZE=4 "
        "'BUCKET_KEYS=[128,256]'\nvalues are JSON: strings in double quotes, e.g. "
        "'NAME=\"x\"'",
    ),
    "unpublish": (
        "sax.cli.admin_cmds:cmd_unpublish",
        "unpublish a model",
        "example:\n  saxutil unpublish /sax/test/tiny",
    ),
    "update": (
        "sax.cli.admin_cmds:cmd_update",
        "change the number of replicas of a model",
        "example:\n  saxutil update -replicas=2 /sax/test/tiny",
    ),
    "update_checkpoint": (
        "sax.cli.admin_cmds:cmd_update_checkpoint",
        "point a model at another checkpoint",
        "example:\n  saxutil update_checkpoint /sax/test/lm /ckpt/smollm2-v2",
    ),
    "watch": (
        "sax.cli.admin_cmds:cmd_watch",
        "print a model's replica addresses as they change (Ctrl-C stops)",
        "example:\n  saxutil watch /sax/test/tiny",
    ),
    "lm.generate": (
        "sax.cli.lm_cmds:cmd_generate",
        "generate text",
        "examples:\n  saxutil lm.generate /sax/test/tiny 'Q: Who are you? A:'\n"
        "  saxutil lm.generate -extra=temperature:0.2,stop:'\\n' -n 2 /sax/test/tiny 'Hi'\n"
        "  echo 'Hello' | saxutil lm.generate -stream /sax/test/tiny -",
    ),
    "lm.score": (
        "sax.cli.lm_cmds:cmd_score",
        "score suffixes given a prefix",
        "example:\n  saxutil lm.score /sax/test/tiny 'Q: 1+1? A:' ' 2' ' 3'",
    ),
    "convert": (
        "sax.cli.convert_cmds:cmd_convert",
        "convert a GGUF file, Hugging Face folder or Meta Llama folder into a checkpoint",
        "examples:\n  saxutil convert --from gguf SmolLM2-135M-Instruct.Q4_1.gguf /ckpt/smollm2\n"
        "  saxutil convert --from hf --dtype bfloat16 ./Llama-2-7b-hf gs://bucket/llama7b\n"
        "  saxutil convert --from meta --shard-size 5GB ./llama-2-70b /ckpt/llama70b\n"
        "the checkpoint goes to DST/checkpoint_00000000",
    ),
    "estimate": (
        "sax.cli.convert_cmds:cmd_estimate",
        "estimate the memory of a config or checkpoint per dtype",
        "examples:\n  saxutil estimate llama.LLaMA7BFP16\n"
        "  saxutil estimate --device-memory 24GiB /ckpt/smollm2\n"
        "  saxutil estimate --json --batch-size 8 --seq-len 2048 gs://bucket/llama7b",
    ),
}

_BOOL_FLAGS = ("stream", "terse", "json", "quiet")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become UsageError (one line, exit status 1)."""

    def error(self, message: str) -> NoReturn:
        if self.prog == "saxutil":
            match = re.search(r"invalid choice: '?([^' ]*)'?", message)
            if match:
                raise UsageError(
                    f"unknown command {match.group(1)!r}; run 'saxutil --help' to list the commands"
                )
            if "arguments are required: COMMAND" in message:
                raise UsageError("no command given; run 'saxutil --help' to list the commands")
        where = "" if self.prog == "saxutil" else self.prog.removeprefix("saxutil ") + ": "
        raise UsageError(f"{where}{message}; run '{self.prog} --help' for usage")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Adds a flag under both spellings, -name and --name."""
    parser.add_argument(f"-{name}", f"--{name}", dest=name, **kwargs)


def _global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    _flag(
        parser,
        "sax_root",
        default=default,
        metavar="PATH",
        help="where the cells live: a local folder or gs://bucket/prefix (default: $SAX_ROOT)",
    )
    _flag(
        parser,
        "sax_timeout",
        type=parse_duration,
        default=default,
        metavar="DURATION",
        help='timeout of each call: seconds or a Go duration, e.g. "60", "60s", "2m" '
        "(default: 30s for admin calls, 60s for lm calls)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The saxutil argument parser with every subcommand."""
    common = _Parser(add_help=False, allow_abbrev=False)
    _global_flags(common, argparse.SUPPRESS)
    parser = _Parser(
        prog="saxutil",
        description="Manage and query a sax cluster.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _global_flags(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, (handler, help_text, epilog) in _COMMANDS.items():
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        p.set_defaults(handler=handler)
        subs[name] = p
    help_p = sub.add_parser("help", help="show the help of saxutil or of one command")
    help_p.add_argument("topic", nargs="?", help="a command name")
    help_p.set_defaults(handler="")
    _add_arguments(subs)
    parser.set_defaults(_subparsers=subs)
    return parser


def _add_arguments(subs: dict[str, argparse.ArgumentParser]) -> None:
    p = subs["create"]
    p.add_argument("cell", help="the cell, e.g. /sax/test")
    p.add_argument(
        "fs_root",
        nargs="?",
        default="",
        help="where to keep its state (default: the cell's folder under sax_root)",
    )
    p.add_argument("admin_acl", nargs="?", default="", help="admin ACL, e.g. acl/all")

    p = subs["ls"]
    p.add_argument("path", nargs="?", default="/sax", help="/sax, /sax/<cell> or a model id")
    _flag(p, "json", action="store_true", help="print JSON instead of a table")

    p = subs["publish"]
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("model_path", help="registered config name, e.g. test.TinyLM")
    p.add_argument(
        "checkpoint_path", help='checkpoint folder or gs:// URL; "None" for test configs'
    )
    p.add_argument("replicas", help="number of replicas, >= 0")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (JSON)"
    )

    p = subs["unpublish"]
    p.add_argument("model_id", help="e.g. /sax/test/tiny")

    p = subs["update"]
    _flag(p, "replicas", type=int, default=-1, metavar="N", help="new number of replicas (>= 0)")
    p.add_argument("model_id", help="e.g. /sax/test/tiny")

    p = subs["update_checkpoint"]
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("checkpoint_path", help="the new checkpoint")

    p = subs["watch"]
    _flag(
        p,
        "max_updates",
        type=int,
        default=0,
        metavar="N",
        help="stop after N address sets (default: run until Ctrl-C)",
    )
    p.add_argument("model_id", help="e.g. /sax/test/tiny")

    for name in ("lm.generate", "lm.score"):
        _flag(
            subs[name],
            "extra",
            default="",
            metavar="K:V,...",
            help="extra inputs, e.g. temperature:0.2,stop:'\\n' (quoted values are strings)",
        )
        _flag(subs[name], "json", action="store_true", help="print JSON instead of a table")
    p = subs["lm.generate"]
    _flag(p, "n", type=int, default=0, metavar="N", help="print at most N samples")
    _flag(p, "stream", action="store_true", help="print the text as it is generated")
    _flag(p, "terse", action="store_true", help="print only the texts, best score first")
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("query", help="the prompt, or - to read it from stdin")

    p = subs["lm.score"]
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("prefix", help="the conditioning text (may be empty)")
    p.add_argument("suffixes", nargs="+", metavar="suffix", help="texts to score")

    p = subs["convert"]
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
    _flag(p, "dtype", choices=("float32", "bfloat16", "float16"), default=None, help="output dtype")
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
    _flag(p, "quiet", action="store_true", help="no progress bar")
    _flag(p, "json", action="store_true", help="print JSON")

    p = subs["estimate"]
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
    _flag(p, "json", action="store_true", help="print JSON instead of a table")


def _normalize_bools(argv: Sequence[str]) -> list[str]:
    """Turns Go-style `-stream=true` / `-stream=false` into `--stream` / nothing."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        match = re.fullmatch(r"--?(\w+)=(\w+)", arg)
        if match and match.group(1) in _BOOL_FLAGS:
            value = match.group(2).lower()
            if value in ("true", "1", "t", "yes"):
                out.append(f"--{match.group(1)}")
                continue
            if value in ("false", "0", "f", "no"):
                continue
        out.append(arg)
    return out


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "help":
        target = args._subparsers.get(args.topic) if args.topic else parser
        if target is None:
            raise UsageError(f"unknown command {args.topic!r}; run 'saxutil --help'")
        target.print_help()
        return 0
    import sax

    sax.SetSaxRoot(args.sax_root)
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args) or 0)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs saxutil with `argv` (default: sys.argv[1:]); returns the exit status."""
    debug = os.environ.get("SAX_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    argv = _normalize_bools(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = "saxutil"
    try:
        args = parser.parse_args(argv)
        command = args.command
        return _run(args, parser)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        return 130
    except UsageError as e:
        print(f"saxutil: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, exit 1
        if debug:
            traceback.print_exc()
        print(f"saxutil: {_describe(command, e)}", file=sys.stderr)
        return 1


def _describe(command: str, err: Exception) -> str:
    from sax.errors import SaxError

    if isinstance(err, SaxError):
        return f"{command}: {err.code.name}: {_one_line(str(err))}"
    return (
        f"{command}: unexpected error {_one_line(repr(err))}; rerun with SAX_DEBUG=1 for the "
        "traceback and report it"
    )


if __name__ == "__main__":
    sys.exit(main())
