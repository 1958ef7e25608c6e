"""Logging set-up shared by saxutil and the servers: one line format and a checked
`--log_level` flag."""

from __future__ import annotations

import argparse
import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _level(value: str) -> str:
    level = value.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise argparse.ArgumentTypeError(
            f"unknown level {value!r}; use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def add_log_level_flag(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """Adds `--log_level` (a level name, any case; parsed to upper case)."""
    parser.add_argument(
        "--log_level", type=_level, default=default, help="DEBUG, INFO, WARNING or ERROR"
    )


def configure_logging(level: str | int) -> None:
    """Sends the process's log lines to stderr in the project's one format."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
