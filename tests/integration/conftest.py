"""Fixtures that run real cells (admin and model servers as processes on 127.0.0.1)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.cluster import Cluster


@pytest.fixture
def local_cluster(tmp_path) -> Iterator[Cluster]:
    """A cell on a local-folder sax_root, created, with nothing started."""
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    r = c.saxutil("create", c.cell)
    assert r.returncode == 0, r.stderr
    yield c
    c.close()


@pytest.fixture(params=["local", "gcs"])
def any_cluster(request, tmp_path, monkeypatch) -> Iterator[Cluster]:
    """A cell on a local folder, then on gs:// served by the storage emulator; not created."""
    if request.param == "local":
        c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    else:
        emulator = request.getfixturevalue("gcs_emulator")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
        c = Cluster(
            root=emulator.root(f"flow-{uuid.uuid4().hex[:8]}"),
            workdir=tmp_path,
            env={"STORAGE_EMULATOR_HOST": emulator.host},
        )
    yield c
    c.close()
