"""The JAX backend's modules: rotary tables equal to the torch model's, no torch imported, and no
import cycle through the backend, the loader or the models."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from model_server.models.llama_jax import rope_tables
from servables import registry

ROOT = pathlib.Path(__file__).resolve().parents[4]


@pytest.mark.parametrize(
    ("name", "length"),
    [
        ("llama.SmolLM2_135M", 8192),  # head dim 64, theta 100000
        ("llama.LLaMA7BFP16", 4096),  # head dim 128, theta 10000
        ("llama.LLaMA13BFP16", 160),
    ],
)
def test_rope_tables_match_torch(name: str, length: int) -> None:
    """The same formula as `llama_torch.rope_tables`, float32. The two libraries' float32
    pow/cos/sin differ in the last bit, so an angle may differ by a few ulps (an inverse
    frequency one ulp apart, times the position) and each value by about one ulp more."""
    torch = pytest.importorskip("torch")
    from model_server.models.llama_torch import rope_tables as torch_rope_tables

    config = registry.get(name)
    half = config.head_dim // 2
    cos, sin = rope_tables(config, length)
    want = torch_rope_tables(config.head_dim, config.rope_theta, length, torch.device("cpu"))
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim
    inv_freq = (1.0 / config.rope_theta ** exponents.astype(np.float64)).astype(np.float32)
    angles = np.outer(np.arange(length, dtype=np.float32), inv_freq)
    bound = 4 * np.spacing(angles) + 2 * np.spacing(np.float32(1))
    for got, expected in ((cos, want[0, :, :half]), (sin, want[1, :, :half])):
        expected = expected.numpy()
        assert got.dtype == np.float32 and got.shape == expected.shape == (length, half)
        assert np.all(np.abs(got - expected) <= bound)
        assert np.array_equal(got[0], expected[0])  # position 0: exactly 1 and 0
    # A theta given as an int override gives the same tables.
    other = dataclasses.replace(config, rope_theta=int(config.rope_theta))
    assert np.array_equal(rope_tables(other, 16)[0], cos[:16])


def test_the_backend_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import model_server.backends.jax.jax_runner, model_server.backends.jax.multihost\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The modules of `modules` a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def test_no_import_cycle_through_the_backend() -> None:
    files = {}
    for path in (ROOT / "model_server").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    watched = [
        name
        for name in files
        if name.startswith(("model_server.backends.jax", "model_server.models"))
        or name == "model_server.loader"
    ]

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return False

    assert [name for name in watched if reaches(name, name)] == []
