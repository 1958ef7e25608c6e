"""Checks a deployment command line against the real parsers of the project's entry points.

`check_argv(["python", "-m", "model_server", "--port=10001", ...], env, where)` parses the flags
with model_server's own parser (and its checks of chips, topologies and cells), as the process
would at start; likewise admin_server, gateway, sax.health_probe and saxutil. `sh -c SCRIPT` is
split into its simple commands and each of those is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

# Modules run with `python -m` that a deployment may name.
SERVER_MODULES = ("admin_server", "model_server", "gateway")
PYTHONS = ("python", "python3", "python3.12")
REPO = Path(__file__).resolve().parents[1]
# The entry points are imported from this checkout when the installed project lacks one.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_parser(parse: Callable[[], object]) -> str:
    """ "" when `parse` accepts the flags, else the parser's last error line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse()
    except SystemExit as e:
        if e.code not in (0, None):
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            return lines[-1] if lines else f"exit status {e.code}"
    except Exception as e:  # noqa: BLE001 - a parser that raises its own usage error
        return str(e)
    return ""


def _gateway_parse() -> Callable[[list[str]], object] | None:
    """The gateway's own flag parsing (with its checks), if its __main__ has one."""
    try:
        main = importlib.import_module("gateway.__main__")
    except ImportError:
        return None
    parse = getattr(main, "parse_settings", None)
    if callable(parse):
        return parse
    for name in ("build_parser", "parser", "make_parser", "_parser", "_build_parser"):
        fn = getattr(main, name, None)
        if callable(fn):
            with contextlib.suppress(TypeError):
                p = fn()
                if isinstance(p, argparse.ArgumentParser):
                    return p.parse_args
    return None


def _gateway_flags_from_help() -> set[str] | None:
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    if r.returncode != 0:
        return None
    return set(re.findall(r"(--[a-z][a-z0-9_-]*)", r.stdout))


def _check_gateway(args: list[str]) -> str:
    parse = _gateway_parse()
    if parse is not None:
        return _run_parser(lambda: parse(args))
    known = _gateway_flags_from_help()
    if known is None:
        return "`python -m gateway --help` failed: is the gateway package installed?"
    unknown = [a.split("=")[0] for a in args if a.startswith("--")]
    unknown = [a for a in unknown if a not in known]
    return (
        f"unknown flags {unknown}; `python -m gateway --help` lists {sorted(known)}"
        if unknown
        else ""
    )


def _check_module(module: str, args: list[str], env: Mapping[str, str]) -> str:
    error = ""
    if module == "admin_server":
        from admin_server.__main__ import _parser as admin_parser

        error = _run_parser(lambda: admin_parser().parse_args(args))
    elif module == "gateway":
        error = _check_gateway(args)
    has_root = bool(env.get("SAX_ROOT")) or any(a.startswith("--sax_root") for a in args)
    if module in ("admin_server", "gateway"):
        return error or ("" if has_root else "no sax_root: set SAX_ROOT or pass --sax_root")
    if module == "model_server":
        from model_server.__main__ import parse_config

        with _environ({"SAX_ROOT": env.get("SAX_ROOT", "")}):
            return _run_parser(lambda: parse_config(args))
    if module == "sax.health_probe":
        from sax.health_probe import parser as probe_parser

        return _run_parser(lambda: probe_parser().parse_args(args))
    return f"python -m {module} is not an entry point of this project"


def _check_saxutil(args: list[str]) -> str:
    from sax.cli.main import build_parser

    return _run_parser(lambda: build_parser().parse_args(args))


def _shell_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("|", "||", "&&", ";", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def check_argv(argv: list[str], env: Mapping[str, str], where: str) -> list[str]:
    """Problems of one command line (empty: the entry point accepts it), each starting with
    `where`."""
    if not argv:
        return [f"{where}: empty command"]
    exe = os.path.basename(argv[0])
    if exe in ("sh", "bash") and len(argv) >= 3 and argv[1] == "-c":
        problems = []
        for command in _shell_commands(argv[2]):
            if os.path.basename(command[0]) in ("saxutil", *PYTHONS):
                problems.extend(check_argv(command, env, where))
        return problems
    if exe == "saxutil":
        error = _check_saxutil(argv[1:])
    elif exe in PYTHONS and len(argv) >= 3 and argv[1] == "-m":
        error = _check_module(argv[2], argv[3:], env)
    else:
        error = f"{argv[0]!r} is not an entry point of this project (python -m ..., saxutil)"
    return [f"{where}: {shlex.join(argv)}: {error}"] if error else []


def module_of(argv: list[str]) -> str:
    """ "model_server" for ["python", "-m", "model_server", ...]; "" for anything else."""
    if len(argv) >= 3 and os.path.basename(argv[0]) in PYTHONS and argv[1] == "-m":
        return argv[2]
    return ""
