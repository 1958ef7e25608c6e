"""`saxutil`: manage cells and models, and query them, from the command line.

Subcommands are argparse subparsers; their code lives in sax.cli.admin_cmds and sax.cli.lm_cmds,
imported only when the command runs. Every flag takes both spellings, `-flag` and `--flag`
(Saxml's Go flags use one dash: `-replicas=2`, `-extra=temperature:0.2`).

Other installed packages add commands through the `saxutil.commands` entry-point group (this
project's `tools` adds `convert` and `estimate`): each entry point names a function that gets a
`CommandRegistry` and adds its subcommand to it. sax never imports them itself; an entry point
that cannot be loaded is skipped (logged with SAX_DEBUG=1) and the other commands work as usual.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, NoReturn

from sax.cli.common import UsageError, flag, parse_duration
from sax.logs import configure_logging

logger = logging.getLogger(__name__)

# The entry-point group of the commands that other packages add to saxutil.
COMMANDS_GROUP = "saxutil.commands"

# A command's handler: takes the parsed arguments, returns the exit status (None: 0).
Handler = Callable[[argparse.Namespace], "int | None"]

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
}


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


class CommandRegistry:
    """What the functions of the `saxutil.commands` entry points get: `add` makes a subcommand
    that behaves like the built-in ones (both flag spellings via `sax.cli.common.flag`, the
    global flags after the command, errors on one line, `saxutil help NAME`)."""

    def __init__(
        self,
        sub: Any,
        common: argparse.ArgumentParser,
        subs: dict[str, argparse.ArgumentParser],
    ) -> None:
        self._sub = sub
        self._common = common
        self._subs = subs

    def add(
        self, name: str, handler: Handler | str, help_text: str, epilog: str = ""
    ) -> argparse.ArgumentParser:
        """Adds the subcommand `name`, run by `handler` (a function or "module:function",
        imported when the command runs); returns its parser, to add the arguments to.
        `help_text` is the one line of `saxutil --help`; `epilog` holds the examples."""
        if name in self._subs:
            raise ValueError(f"saxutil already has a command {name!r}")
        p = self._sub.add_parser(
            name,
            parents=[self._common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        p.set_defaults(handler=handler)
        self._subs[name] = p
        return p


def _add_installed_commands(commands: CommandRegistry) -> None:
    """Runs the registration function of every `saxutil.commands` entry point, by name."""
    try:
        found = sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)
    except Exception:  # broken metadata must not break the other commands
        logger.debug("cannot list the %s entry points", COMMANDS_GROUP, exc_info=True)
        return
    for entry_point in found:
        try:
            entry_point.load()(commands)
        except Exception:  # e.g. its package is not installed: skip it
            logger.debug(
                "skipping saxutil command %r (%s)",
                entry_point.name,
                entry_point.value,
                exc_info=True,
            )


def _global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    flag(
        parser,
        "sax_root",
        default=default,
        metavar="PATH",
        help="where the cells live: a local folder or gs://bucket/prefix (default: $SAX_ROOT)",
    )
    flag(
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
    commands = CommandRegistry(sub, common, subs)
    for name, (handler, help_text, epilog) in _COMMANDS.items():
        commands.add(name, handler, help_text, epilog)
    _add_arguments(subs)
    _add_installed_commands(commands)
    help_p = sub.add_parser("help", help="show the help of saxutil or of one command")
    help_p.add_argument("topic", nargs="?", help="a command name")
    help_p.set_defaults(handler="")
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
    flag(p, "json", action="store_true", help="print JSON instead of a table")

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
    flag(p, "replicas", type=int, default=-1, metavar="N", help="new number of replicas (>= 0)")
    p.add_argument("model_id", help="e.g. /sax/test/tiny")

    p = subs["update_checkpoint"]
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("checkpoint_path", help="the new checkpoint")

    p = subs["watch"]
    flag(
        p,
        "max_updates",
        type=int,
        default=0,
        metavar="N",
        help="stop after N address sets (default: run until Ctrl-C)",
    )
    p.add_argument("model_id", help="e.g. /sax/test/tiny")

    for name in ("lm.generate", "lm.score"):
        flag(
            subs[name],
            "extra",
            default="",
            metavar="K:V,...",
            help="extra inputs, e.g. temperature:0.2,stop:'\\n' (quoted values are strings)",
        )
        flag(subs[name], "json", action="store_true", help="print JSON instead of a table")
    p = subs["lm.generate"]
    flag(p, "n", type=int, default=0, metavar="N", help="print at most N samples")
    flag(p, "stream", action="store_true", help="print the text as it is generated")
    flag(p, "terse", action="store_true", help="print only the texts, best score first")
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("query", help="the prompt, or - to read it from stdin")

    p = subs["lm.score"]
    p.add_argument("model_id", help="e.g. /sax/test/tiny")
    p.add_argument("prefix", help="the conditioning text (may be empty)")
    p.add_argument("suffixes", nargs="+", metavar="suffix", help="texts to score")


def _bool_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The names of the on/off flags (store_true) of every subcommand: json, stream, ..."""
    names: set[str] = set()
    for p in parser.get_default("_subparsers").values():
        for action in p._actions:
            if isinstance(action, argparse._StoreTrueAction):
                names.update(o.lstrip("-") for o in action.option_strings)
    return names


def _normalize_bools(argv: Sequence[str], bool_flags: set[str]) -> list[str]:
    """Turns Go-style `-stream=true` / `-stream=false` into `--stream` / nothing."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        match = re.fullmatch(r"--?(\w+)=(\w+)", arg)
        if match and match.group(1) in bool_flags:
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
    handler = args.handler
    if isinstance(handler, str):
        module_name, func_name = handler.split(":")
        handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args) or 0)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs saxutil with `argv` (default: sys.argv[1:]); returns the exit status."""
    debug = os.environ.get("SAX_DEBUG", "") not in ("", "0")
    configure_logging(logging.DEBUG if debug else logging.WARNING)
    parser = build_parser()
    argv = _normalize_bools(sys.argv[1:] if argv is None else argv, _bool_flags(parser))
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
