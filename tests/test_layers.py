"""The layers at run time: what importing a package really loads, in a fresh interpreter.

The import-linter contracts of pyproject.toml (`.venv/bin/lint-imports`, run by scripts/test.sh)
read the source; these tests import the modules, which also catches imports made by the
libraries they use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Imports the given modules one by one and prints, as JSON, the first of them after which each
# watched top-level package was in sys.modules (watched packages never loaded are left out).
_PROBE = """
import importlib, json, sys
modules, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
first = {}
for name in modules:
    importlib.import_module(name)
    for pkg in watched:
        if pkg not in first and pkg in sys.modules:
            first[pkg] = name
print(json.dumps(first))
"""


def modules_under(package: str) -> list[str]:
    """The dotted names of the package and of every module below it, from the source tree."""
    root = REPO / package.replace(".", "/")
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names))


def first_importers(modules: list[str], watched: list[str]) -> dict[str, str]:
    """{watched package: the first of `modules` whose import loaded it} in a new interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(watched)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_engine_core_imports_neither_torch_nor_jax() -> None:
    """model_server.engine (request, scheduler, kv cache, detokenizer, the loop) is backend-free:
    the runners under model_server.backends bring torch or JAX."""
    modules = modules_under("model_server.engine")
    assert "model_server.engine.engine" in modules and "model_server.engine.scheduler" in modules
    assert first_importers(modules, ["torch", "jax"]) == {}


def test_servables_import_neither_torch_nor_jax() -> None:
    modules = modules_under("servables")
    assert "servables.registry" in modules and "servables.checkpoint" in modules
    assert first_importers(modules, ["torch", "jax"]) == {}


def test_saxutil_loads_only_the_client() -> None:
    """`import sax` and saxutil's parser (with the commands of its entry points) load no server
    package and no ML library."""
    code = (
        "import sax, sax.cli.main, sax.cli.admin_cmds, sax.cli.lm_cmds; sax.cli.main.build_parser()"
    )
    watched = ["torch", "jax", "numpy", "safetensors", "yaml", "prometheus_client"]
    watched += ["servables", "model_server", "admin_server", "gateway", "tools.convert"]
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    assert sorted(loaded & set(watched)) == []
    assert "tools.cli" in loaded  # the convert and estimate commands, through the entry points


def test_the_probe_names_the_first_importer() -> None:
    modules = ["sax.naming", "email.message", "email.parser"]
    assert first_importers(modules, ["sax", "email", "torch"]) == {
        "sax": "sax.naming",
        "email": "email.message",
    }
