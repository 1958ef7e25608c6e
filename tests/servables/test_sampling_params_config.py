"""SamplingParams: extra inputs checked against the config's declared keys."""

from __future__ import annotations

import dataclasses

import pytest

from sax.errors import InvalidArgumentError
from sax.v1 import common_pb2
from servables import registry
from servables.sampling_params import SamplingParams

CONFIG = registry.get("test.TinyLM")


def params(**kwargs: object) -> SamplingParams:
    return SamplingParams.from_extra_inputs(common_pb2.ExtraInputs(**kwargs), CONFIG)


def test_defaults_come_from_the_config() -> None:
    p = SamplingParams.defaults(CONFIG)
    assert p.num_samples == CONFIG.num_samples
    assert p.temperatures == (0.5,) * CONFIG.num_samples
    assert p.max_decode_steps == 32
    assert p.seed == 0
    assert dict(p.values) == dict(CONFIG.extra_inputs)


def test_request_values_override_defaults() -> None:
    p = params(items={"temperature": 0.0, "per_example_max_decode_steps": 5, "seed": 7})
    assert p.temperatures == (0.0, 0.0)
    assert p.max_decode_steps == 5
    assert p.seed == 7


def test_per_sample_temperature_tensor() -> None:
    p = params(tensors={"temperature": common_pb2.Tensor(values=[0.0, 0.5])})
    assert p.temperatures == (0.0, 0.5)
    with pytest.raises(InvalidArgumentError, match="one per sample"):
        params(tensors={"temperature": common_pb2.Tensor(values=[0.1, 0.2, 0.3])})


def test_unknown_key_names_the_allowed_keys() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        params(items={"top_k": 3})
    assert "top_k" in str(e.value)
    assert "per_example_max_decode_steps, seed, temperature" in str(e.value)


def test_key_in_two_maps() -> None:
    with pytest.raises(InvalidArgumentError, match="in one map only"):
        params(
            items={"temperature": 0.1}, tensors={"temperature": common_pb2.Tensor(values=[1, 2])}
        )


@pytest.mark.parametrize(
    "items",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"per_example_max_decode_steps": 0},
        {"per_example_max_decode_steps": -3},
        {"per_example_max_decode_steps": 33},
        {"per_example_max_decode_steps": 2.5},
        {"seed": -1},
        {"seed": 1.5},
    ],
)
def test_bad_values(items: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError):
        params(items=items)


def test_string_for_a_number_is_refused() -> None:
    config = dataclasses.replace(
        CONFIG, extra_inputs={"temperature": 0.0, "stop": "\n"}, num_samples=1
    )
    p = SamplingParams.from_extra_inputs(common_pb2.ExtraInputs(strings={"stop": "."}), config)
    assert p.values["stop"] == "."
    with pytest.raises(InvalidArgumentError, match="must be a number"):
        SamplingParams.from_extra_inputs(
            common_pb2.ExtraInputs(strings={"temperature": "hot"}), config
        )


def test_default_decode_steps_are_capped_by_the_config() -> None:
    config = dataclasses.replace(CONFIG, max_decode_steps=8)
    assert SamplingParams.defaults(config).max_decode_steps == 8


def test_seed_past_the_generator_range_is_invalid() -> None:
    extra = common_pb2.ExtraInputs(items={"seed": 1e20})
    with pytest.raises(InvalidArgumentError, match="seed must be below"):
        SamplingParams.from_extra_inputs(extra, CONFIG)
    ok = common_pb2.ExtraInputs(items={"seed": 12345})
    assert SamplingParams.from_extra_inputs(ok, CONFIG).seed == 12345
