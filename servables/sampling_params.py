"""A request's checked inputs: `SamplingParams` from a request's `ExtraInputs`.

`SamplingParams.from_extra_inputs` turns a request's `ExtraInputs` into checked values: every key
must be declared in the config's `extra_inputs`, and appear in one map only. The LM service adds
the call's deadline and a cancel event (`SamplingParams.for_call`). The admin checks a config's
defaults with it at publish time, so it lives beside the configs (no torch, no server code).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sax.errors import InvalidArgumentError
from sax.v1 import common_pb2
from servables.servable_config import ServableConfig

# Extra-input keys the sampling code understands; a config may declare others (passed through).
TEMPERATURE = "temperature"
MAX_DECODE_STEPS = "per_example_max_decode_steps"
SEED = "seed"
TOP_K = "top_k"
TOP_P = "top_p"
REPETITION_PENALTY = "repetition_penalty"
# One stop string, or several as a JSON list of strings ('["\\n\\n", "User:"]'); empty: none.
STOP = "stop"
# Draft tokens per decode step by prompt lookup; 0: no speculation.
SPECULATIVE_TOKENS = "speculative_tokens"
MAX_SPECULATIVE_TOKENS = 16
# Seeds stay below this so seed + sample index fits the 64-bit seed of torch.Generator.
MAX_SEED = 1 << 62


@dataclass(frozen=True)
class SamplingParams:
    """Checked per-request inputs.

    Built by `from_extra_inputs`; `values` holds every declared key (request value or default),
    the typed fields are the ones the sampling code uses.
    """

    # Samples per Generate (the config's num_samples).
    num_samples: int
    # Temperature of each sample; 0 is greedy.
    temperatures: tuple[float, ...]
    # Most tokens generated per sample (<= the config's max_decode_steps).
    max_decode_steps: int
    # Random seed; 0 draws a fresh one per request, anything else makes sampling repeatable.
    seed: int
    # Every declared extra input: a float, a tuple of floats (tensor) or a string.
    values: Mapping[str, Any]
    # Sample among the k likeliest tokens only; 0: no limit, 1: greedy.
    top_k: int = 0
    # Sample from the smallest set of tokens whose probability reaches top_p (after top_k); 1: all.
    top_p: float = 1.0
    # CTRL-style penalty on tokens already in the prompt or the output; 1: none.
    repetition_penalty: float = 1.0
    # The text ends before the first occurrence of any of these strings.
    stop: tuple[str, ...] = ()
    # Tokens guessed by prompt lookup and checked per decode step; 0: none.
    speculative_tokens: int = 0
    # The caller's deadline as a `time.monotonic()` value; None: none. Set by the LM service.
    deadline: float | None = None
    # Set when the caller has gone away (cancel, deadline). Set by the LM service.
    cancel: threading.Event | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def defaults(cls, config: ServableConfig) -> SamplingParams:
        """The params of a request without extra inputs."""
        return cls.from_extra_inputs(None, config)

    def for_call(self, deadline: float | None, cancel: threading.Event | None) -> SamplingParams:
        """A copy carrying the call's deadline (monotonic seconds) and cancel event."""
        return dataclasses.replace(self, deadline=deadline, cancel=cancel)

    def cancelled(self) -> bool:
        """Whether the caller has cancelled."""
        return self.cancel is not None and self.cancel.is_set()

    @classmethod
    def from_extra_inputs(
        cls, extra: common_pb2.ExtraInputs | None, config: ServableConfig
    ) -> SamplingParams:
        """Merges the request's extra inputs over the config's defaults and checks them.

        Raises InvalidArgumentError for an undeclared key, a key in two maps, or a bad value.
        """
        declared = dict(config.extra_inputs)
        values: dict[str, Any] = dict(declared)
        seen: dict[str, str] = {}
        if extra is not None:
            maps: list[tuple[str, Mapping[str, Any]]] = [
                ("items", extra.items),
                ("tensors", extra.tensors),
                ("strings", extra.strings),
            ]
            for kind, entries in maps:
                for key, value in entries.items():
                    if key not in declared:
                        allowed = ", ".join(sorted(declared)) or "(none)"
                        raise InvalidArgumentError(
                            f"extra input {key!r} is not declared by the model's config; "
                            f"allowed keys: {allowed}"
                        )
                    if key in seen:
                        raise InvalidArgumentError(
                            f"extra input {key!r} is set in both {seen[key]} and {kind}; "
                            "set it in one map only"
                        )
                    seen[key] = kind
                    if kind == "tensors":
                        values[key] = _tensor(key, value.values, config.num_samples)
                    elif kind == "strings":
                        values[key] = str(value)
                    else:
                        values[key] = float(value)
        return cls._build(values, seen, config)

    @classmethod
    def _build(
        cls, values: dict[str, Any], given: Mapping[str, str], config: ServableConfig
    ) -> SamplingParams:
        n = config.num_samples
        temps = _temperatures(values.get(TEMPERATURE, 0.0), n)
        steps = config.max_decode_steps
        if MAX_DECODE_STEPS in values:
            raw = _scalar(MAX_DECODE_STEPS, values[MAX_DECODE_STEPS])
            if MAX_DECODE_STEPS in given:
                if raw != int(raw) or not 0 < raw <= config.max_decode_steps:
                    raise InvalidArgumentError(
                        f"{MAX_DECODE_STEPS} must be an integer in [1, {config.max_decode_steps}] "
                        f"(the model's MAX_DECODE_STEPS), got {raw:g}"
                    )
                steps = int(raw)
            else:  # a config default: capped by the config's limit
                steps = max(1, min(int(raw), config.max_decode_steps))
        seed = _integer(SEED, values.get(SEED, 0.0), "a non-negative integer")
        if seed >= MAX_SEED:
            raise InvalidArgumentError(f"{SEED} must be below 2**62, got {seed}")
        top_k = _integer(TOP_K, values.get(TOP_K, 0.0), "an integer >= 0 (0: no limit, 1: greedy)")
        top_p = _scalar(TOP_P, values.get(TOP_P, 1.0))
        if not 0 < top_p <= 1:
            raise InvalidArgumentError(f"{TOP_P} must be in (0, 1] (1: no limit), got {top_p:g}")
        penalty = _scalar(REPETITION_PENALTY, values.get(REPETITION_PENALTY, 1.0))
        if penalty <= 0:
            raise InvalidArgumentError(
                f"{REPETITION_PENALTY} must be > 0 (1: none, > 1 discourages repeats), "
                f"got {penalty:g}"
            )
        speculative = _integer(
            SPECULATIVE_TOKENS,
            values.get(SPECULATIVE_TOKENS, 0.0),
            f"an integer in [0, {MAX_SPECULATIVE_TOKENS}] (0: no speculation)",
        )
        if speculative > MAX_SPECULATIVE_TOKENS:
            raise InvalidArgumentError(
                f"{SPECULATIVE_TOKENS} must be at most {MAX_SPECULATIVE_TOKENS}, got {speculative}"
            )
        return cls(
            num_samples=n,
            temperatures=temps,
            max_decode_steps=steps,
            seed=seed,
            values=types.MappingProxyType(values),
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=penalty,
            stop=parse_stop(values.get(STOP, "")),
            speculative_tokens=speculative,
        )


def parse_stop(value: Any) -> tuple[str, ...]:
    """The stop strings of a `stop` extra input: "" -> none, a JSON list of strings -> those,
    any other string -> itself."""
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"extra input {STOP!r} must be a string (set it in strings), got {value!r}"
        )
    if not value:
        return ()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return tuple(v for v in parsed if v)
    return (value,)


def _integer(key: str, value: Any, what: str) -> int:
    raw = _scalar(key, value)
    if raw != int(raw) or raw < 0:
        raise InvalidArgumentError(f"{key} must be {what}, got {raw:g}")
    return int(raw)


def _tensor(key: str, values: Sequence[float], num_samples: int) -> tuple[float, ...]:
    if len(values) != num_samples:
        raise InvalidArgumentError(
            f"extra input tensor {key!r} has {len(values)} values; it needs one per sample "
            f"({num_samples})"
        )
    return tuple(float(v) for v in values)


def _scalar(key: str, value: Any) -> float:
    if isinstance(value, (tuple, str)):
        raise InvalidArgumentError(f"extra input {key!r} must be a scalar (set it in items)")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"extra input {key!r} must be finite, got {v}")
    return v


def _temperatures(value: Any, num_samples: int) -> tuple[float, ...]:
    if isinstance(value, str):
        raise InvalidArgumentError(f"extra input {TEMPERATURE!r} must be a number, got a string")
    temps = value if isinstance(value, tuple) else (float(value),) * num_samples
    for t in temps:
        if not math.isfinite(t) or t < 0:
            raise InvalidArgumentError(
                f"{TEMPERATURE} must be >= 0 (0 is greedy), got {list(temps)}"
            )
    return tuple(temps)
