"""The thin client alone: a fresh virtual environment with only the client's dependencies (grpcio,
protobuf, google-cloud-storage) and this project installed with --no-deps, against a real cell
whose admin and model server run from the development environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cluster import REPO, Cluster, wait_for

pytestmark = pytest.mark.slow

CLIENT_DEPENDENCIES = ("grpcio", "protobuf", "google-cloud-storage")
# What the project's source distribution needs to build: pyproject.toml, the README it names
# and the packages it finds.
SOURCES = ("pyproject.toml", "README.md", "client", "servables", "tools")
SOURCES += ("admin_server", "model_server", "gateway")
# Packages of the servers that must not be installed in the thin environment (else the test
# would not show that the client does without them).
SERVER_ONLY = ("numpy", "torch", "jax", "yaml", "safetensors", "tokenizers", "prometheus_client")
SERVER_ONLY += ("grpc_health", "tqdm")
M = "/sax/test/tiny"


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def thin_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the client's dependencies (the versions of this environment) and the project
    (from a copy of its sources, so that nothing is built inside the work tree)."""
    tmp = tmp_path_factory.mktemp("thin")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(REPO / name, src / name)
    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    assert r.returncode == 0, r.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    pins = [f"{name}=={version(name)}" for name in CLIENT_DEPENDENCIES]
    r = _run([*pip, "install", "--quiet", *pins], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run([*pip, "install", "--quiet", "--no-deps", str(src)], timeout=600, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def _env(cluster: Cluster) -> dict[str, str]:
    """The cell's environment, without anything that would reach the work tree's packages."""
    return {k: v for k, v in cluster.env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _saxutil(venv: Path, cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(
        [str(venv / "bin" / "saxutil"), *args],
        env=_env(cluster),
        cwd=cluster.workdir,
        timeout=120,
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    yield c
    c.close()


def test_import_sax_needs_only_the_client_dependencies(thin_env: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, json, sys\n"
        "import sax, sax.cli.main, sax.cli.admin_cmds, sax.cli.lm_cmds, sax.storage.gcs\n"
        "sax.cli.main.build_parser()\n"
        f"server_only = {SERVER_ONLY!r}\n"
        "print(json.dumps({'file': sax.__file__, 'loaded': sorted(sys.modules),"
        " 'installed': [m for m in server_only if importlib.util.find_spec(m)]}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = _run([str(thin_env / "bin" / "python"), "-c", code], env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["file"].startswith(str(thin_env)), report["file"]
    assert report["installed"] == []  # the environment really is thin
    servers = ("servables", "model_server", "admin_server", "gateway", "tools.convert")
    assert [m for m in report["loaded"] if m.split(".")[0] in servers or m in servers] == []


def test_saxutil_against_a_real_cell(thin_env: Path, cluster: Cluster) -> None:
    r = _saxutil(thin_env, cluster, "create", cluster.cell)
    assert r.returncode == 0, r.stderr
    cluster.start_admin()
    cluster.start_model_server()

    r = _saxutil(thin_env, cluster, "publish", M, "test.TinyLM", "None", "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: cluster.ready_addresses(M), 60, f"{M} to load\n{cluster.logs()}")

    r = _saxutil(thin_env, cluster, "ls", cluster.cell)
    assert r.returncode == 0, r.stderr
    assert "| tiny     |" in r.stdout
    r = _saxutil(thin_env, cluster, "ls", "--json", M)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["model_path"] == "test.TinyLM" and record["requested_replicas"] == 1

    r = _saxutil(thin_env, cluster, "lm.generate", M, "Hello")
    assert r.returncode == 0, r.stderr + cluster.logs()
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["|", "generate", "|", "Score", "|"] and len(lines) >= 5
    r = _saxutil(thin_env, cluster, "lm.generate", "-json", "-n=1", M, "Hello")
    assert r.returncode == 0, r.stderr
    samples = json.loads(r.stdout)
    assert len(samples) == 1 and isinstance(samples[0]["text"], str)


def test_saxutil_lists_the_tools_and_says_what_they_need(thin_env: Path, cluster: Cluster) -> None:
    r = _saxutil(thin_env, cluster, "--help")
    assert r.returncode == 0 and "convert " in r.stdout and "estimate " in r.stdout
    for argv in (["convert", "--from", "hf", "a", "b"], ["estimate", "test.TinyLM"]):
        r = _saxutil(thin_env, cluster, *argv)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"saxutil: {argv[0]}: FAILED_PRECONDITION: ")
        assert "pip install 'sax-cluster[convert]'" in r.stderr
