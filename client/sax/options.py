"""Per-model and per-call options of the client (Saxml's `sax.Options` and `sax.ModelOptions`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from sax.errors import InvalidArgumentError
from sax.v1 import common_pb2


@dataclass
class Options:
    """Options of a `sax.Model`.

    num_conn: kept for Saxml compatibility (the size of its seed rotation); replicas are picked
        round-robin here, so it has no effect.
    fail_fast: if True, UNAVAILABLE and RESOURCE_EXHAUSTED from a model server are raised at once
        instead of being retried on another replica (NOT_FOUND is still retried).
    """

    num_conn: int = 37
    fail_fast: bool = False


ExtraValue = float | list[float] | str


class ModelOptions:
    """Options of one call: extra inputs (e.g. temperature) and a timeout.

    A key lives in one of three maps (scalars, tensors, strings); setting it in one removes it
    from the others, as the server refuses a key found in two maps.
    """

    def __init__(self) -> None:
        self._items: dict[str, float] = {}
        self._tensors: dict[str, list[float]] = {}
        self._strings: dict[str, str] = {}
        self._timeout: float = -1.0

    def _forget(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"extra input key must be a non-empty string, got {key!r}")
        self._items.pop(key, None)
        self._tensors.pop(key, None)
        self._strings.pop(key, None)

    def SetExtraInput(self, key: str, value: float) -> None:
        """Sets a scalar extra input, e.g. SetExtraInput("temperature", 0.2)."""
        try:
            number = float(value)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(
                f"extra input {key!r} must be a number, got {value!r}; use SetExtraInputString "
                "for text"
            ) from e
        self._forget(key)
        self._items[key] = number

    def SetExtraInputTensor(self, key: str, value: list[float]) -> None:
        """Sets a tensor extra input, e.g. one temperature per sample [0.2, 0.9]."""
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(
                f"extra input tensor {key!r} must be a list of numbers, got {value!r}"
            ) from e
        self._forget(key)
        self._tensors[key] = values

    def SetExtraInputString(self, key: str, value: str) -> None:
        """Sets a string extra input, e.g. SetExtraInputString("stop", "\\n\\n")."""
        self._forget(key)
        self._strings[key] = str(value)

    def GetExtraInput(self, key: str) -> ExtraValue | None:
        """The value set for `key` (a float, a list of floats or a str), or None if unset."""
        if key in self._items:
            return self._items[key]
        if key in self._tensors:
            return list(self._tensors[key])
        return self._strings.get(key)

    def SetTimeout(self, seconds: float) -> None:
        """Sets the call's deadline in seconds; <= 0 means the client's default."""
        self._timeout = float(seconds)

    def GetTimeout(self) -> float:
        """The timeout set with SetTimeout, -1 if none."""
        return self._timeout

    def timeout_or_none(self) -> float | None:
        """The timeout in seconds if one was set, else None."""
        return self._timeout if self._timeout > 0 else None

    def ToProto(self) -> common_pb2.ExtraInputs:
        """The extra inputs as the `sax.v1.ExtraInputs` message sent to model servers."""
        proto = common_pb2.ExtraInputs()
        for key, value in self._items.items():
            proto.items[key] = value
        for key, values in self._tensors.items():
            proto.tensors[key].values.extend(values)
        for key, text in self._strings.items():
            proto.strings[key] = text
        return proto

    def ToDebugString(self) -> str:
        """A readable form, e.g. "ModelOptions(items={'temperature': 0.2}, timeout=-1.0)"."""
        return (
            f"ModelOptions(items={self._items}, tensors={self._tensors}, "
            f"strings={self._strings}, timeout={self._timeout})"
        )

    __repr__ = ToDebugString

    def __copy__(self) -> ModelOptions:
        return self.__deepcopy__({})

    def __deepcopy__(self, memo: dict) -> ModelOptions:
        new = ModelOptions()
        new._items = copy.deepcopy(self._items, memo)
        new._tensors = copy.deepcopy(self._tensors, memo)
        new._strings = copy.deepcopy(self._strings, memo)
        new._timeout = self._timeout
        return new
