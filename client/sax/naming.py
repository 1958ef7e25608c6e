"""Cell and model names: "/sax/<cell>" and "/sax/<cell>/<model>" (as Saxml)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sax.errors import InvalidArgumentError

PREFIX = "sax"
_NAME_RE = re.compile(r"^[a-z]+[a-z0-9_-]*$")


def _check_name(kind: str, name: str, full: str) -> None:
    if not _NAME_RE.match(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r} in {full!r}: use lowercase letters, digits, '-' and "
            "'_', starting with a letter"
        )


@dataclass(frozen=True)
class CellName:
    """A cell, e.g. CellName("test") for "/sax/test"."""

    cell: str

    @property
    def full(self) -> str:
        return f"/{PREFIX}/{self.cell}"

    def __str__(self) -> str:
        return self.full


@dataclass(frozen=True)
class ModelName:
    """A model, e.g. ModelName("test", "tiny") for "/sax/test/tiny"."""

    cell: str
    model: str

    @property
    def full(self) -> str:
        return f"/{PREFIX}/{self.cell}/{self.model}"

    @property
    def cell_name(self) -> CellName:
        return CellName(self.cell)

    def __str__(self) -> str:
        return self.full


def parse_cell(full: str) -> CellName:
    """Parses "/sax/<cell>"; raises InvalidArgumentError on anything else."""
    parts = full.split("/") if isinstance(full, str) else []
    if len(parts) != 3 or parts[0] != "" or parts[1] != PREFIX:
        raise InvalidArgumentError(f"invalid cell {full!r}: expected /{PREFIX}/<cell>")
    _check_name("cell", parts[2], full)
    return CellName(parts[2])


def parse_model(full: str) -> ModelName:
    """Parses "/sax/<cell>/<model>"; raises InvalidArgumentError on anything else."""
    parts = full.split("/") if isinstance(full, str) else []
    if len(parts) != 4 or parts[0] != "" or parts[1] != PREFIX:
        raise InvalidArgumentError(f"invalid model id {full!r}: expected /{PREFIX}/<cell>/<model>")
    _check_name("cell", parts[2], full)
    _check_name("model", parts[3], full)
    return ModelName(parts[2], parts[3])


def parse_cell_or_model(full: str) -> CellName | ModelName:
    """Parses either form."""
    if isinstance(full, str) and full.count("/") == 3:
        return parse_model(full)
    return parse_cell(full)
