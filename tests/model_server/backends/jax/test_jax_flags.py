"""Backend and multi-process flags of `python -m model_server`, and the config hand-off to
follower processes."""

from __future__ import annotations

import pytest

from model_server.__main__ import parse_config
from model_server.backends.jax.multihost import MultihostConfig, decode_config, encode_config
from model_server.config import ModelServerConfig
from servables import registry
from servables.servable_config import apply_overrides


def test_backend_flags() -> None:
    config, _ = parse_config(
        [
            "--backend=jax",
            "--jax_cache_dir=/tmp/c",
            "--jax_coordinator=10.0.0.1:8476",
            "--jax_num_processes=4",
            "--jax_process_id=3",
            "--platform_chip=tpuv5e",
            "--platform_topology=4x4",
        ]
    )
    assert (config.backend, config.jax_cache_dir, config.jax_process_id) == ("jax", "/tmp/c", 3)
    group = MultihostConfig(config.jax_coordinator, config.jax_num_processes, 3)
    assert group.control_address() == ("10.0.0.1", 8477)
    assert ModelServerConfig(chip="tpuv5e").resolved_backend() == "jax"
    assert ModelServerConfig(chip="cpu").resolved_backend() == "torch"
    assert ModelServerConfig(chip="h100", backend="jax").resolved_backend() == "jax"


@pytest.mark.parametrize(
    "flags",
    [
        ["--backend=tensorflow"],
        ["--jax_coordinator=nohost", "--jax_num_processes=2"],
        ["--jax_coordinator=h:1", "--jax_num_processes=2", "--jax_process_id=2"],
        ["--jax_coordinator=h:1", "--jax_num_processes=1"],
    ],
)
def test_bad_backend_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_config(flags)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_config_round_trip() -> None:
    for name in ("llama.SmolLM2_135M", "llama.LLaMA70BFP16TPUv5e", "test.TinyLM"):
        config = apply_overrides(
            registry.get(name), {"BATCH_SIZE": "[1, 4]", "ICI_MESH_SHAPE": "[1, 2, 4]"}
        )
        assert decode_config(encode_config(config)) == config
