"""Small pieces shared by the saxutil commands: usage errors, flags, flag value parsers."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, TypeVar

T = TypeVar("T")

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class UsageError(Exception):
    """A wrong command line; saxutil prints it on one line and exits with status 1."""


def parse_duration(text: str) -> float:
    """Seconds from "60" or a Go duration such as "60s", "2m", "1m30s", "500ms"."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _PART_RE.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise argparse.ArgumentTypeError(
                f'bad duration {text!r}: use seconds or a Go duration, e.g. "60", "60s", "2m"'
            ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive")
    return seconds


def from_flags(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """An instance of the dataclass `cls` whose fields take the parsed flags of the same name;
    `values` supply or override fields (flags that need converting first)."""
    names = (f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**given, **values})


def flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Adds a flag under both spellings, -name and --name (dest: name)."""
    parser.add_argument(f"-{name}", f"--{name}", dest=name, **kwargs)
