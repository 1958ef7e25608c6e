"""The servable config registry: every module of servables.configs registers its configs."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import servables.configs
from sax.errors import NotFoundError
from servables import registry


def test_every_config_module_is_found() -> None:
    modules = {m.name for m in pkgutil.iter_modules(servables.configs.__path__)}
    assert {"llama", "test"} <= modules
    assert {name.split(".")[0] for name in registry.names()} == modules
    assert "test.TinyLM" in registry.names()
    assert "llama.LLaMA7BFP16TPUv5e" in registry.names()


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(NotFoundError, match=r"registered: .*test\.TinyLM"):
        registry.get("llama.Nope")


def test_the_registry_imports_no_torch_nor_jinja() -> None:
    code = (
        "import sys; from servables import registry; registry.names(); "
        "assert not {'torch', 'jax', 'jinja2'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
