"""Runs a real cell on 127.0.0.1 for tests: an admin and model servers as separate processes.

Every process logs to a file under the test's tmp folder; `Cluster.logs()` returns the tails for
assertion messages. Everything started is killed at `close()`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sax import cell as cell_layout
from sax.naming import parse_cell
from sax.storage import open_store
from sax.v1 import admin_pb2, admin_pb2_grpc, modelet_pb2, modelet_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Polls predicate until it returns a truthy value; raises AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last_exc!r})")


@dataclass
class Proc:
    """A started server process."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.popen.wait(timeout=30)


@dataclass
class Cluster:
    """A cell under `root` (a local folder or gs:// URL) with processes started on demand."""

    root: str
    workdir: Path
    cell: str = "/sax/test"
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    admin: Proc | None = None

    def __post_init__(self) -> None:
        self.env = {**os.environ, **self.env, "SAX_ROOT": self.root, "PYTHONUNBUFFERED": "1"}
        self.store = open_store(self.root)

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, args: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        f = log.open("ab")
        popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT
        )
        proc = Proc(name=name, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def start_admin(self, *flags: str) -> Proc:
        """Starts an admin server on a free port and waits for its location record."""
        before = self._admin_id()
        name = f"admin{sum(p.name.startswith('admin') for p in self.procs)}"
        self.admin = self._start(
            name,
            [
                "-m",
                "admin_server",
                f"--sax_cell={self.cell}",
                "--port=0",
                "--host=127.0.0.1",
                *flags,
            ],
        )
        admin = self.admin

        def ready() -> bool:
            assert admin.alive(), f"admin exited:\n{self.logs()}"
            return self._admin_id() not in ("", before)

        wait_for(ready, 30, "the admin's location record")
        admin.address = cell_layout.read_location(self.store, parse_cell(self.cell)).location
        return admin

    def start_standby_admin(self, *flags: str) -> Proc:
        """Starts another admin for the cell while one leads, and waits until it listens. It
        waits as a standby and takes over when the leader's lease runs out."""
        name = f"admin{sum(p.name.startswith('admin') for p in self.procs)}"
        proc = self._start(
            name,
            [
                "-m",
                "admin_server",
                f"--sax_cell={self.cell}",
                "--port=0",
                "--host=127.0.0.1",
                *flags,
            ],
        )

        def listening() -> str:
            assert proc.alive(), f"admin exited:\n{self.logs()}"
            m = re.search(r"listening on (\S+)", proc.log.read_text())
            return m.group(1) if m else ""

        proc.address = wait_for(listening, 30, f"{name} to listen")
        return proc

    def start_model_server(self, *flags: str) -> Proc:
        """Starts a model server on a free port and waits until the admin lists it."""
        name = f"ms{sum(p.name.startswith('ms') for p in self.procs)}"
        proc = self._start(
            name,
            [
                "-m",
                "model_server",
                f"--sax_cell={self.cell}",
                "--port=0",
                "--host=127.0.0.1",
                "--platform_chip=cpu",
                "--platform_topology=1",
                "--join_period_s=0.5",
                *flags,
            ],
        )

        def listening() -> str:
            assert proc.alive(), f"model server exited:\n{self.logs()}"
            m = re.search(r"listening on (\S+)", proc.log.read_text())
            return m.group(1) if m else ""

        proc.address = wait_for(listening, 30, f"{name} to listen")
        wait_for(lambda: proc.address in self.server_addresses(), 30, f"{name} to join")
        return proc

    def start_follower(self, *flags: str) -> Proc:
        """Starts a non-zero process of a multi-process model server (`--jax_process_id=N`
        among the flags); it serves nothing itself, so nothing is waited for."""
        name = f"follower{sum(p.name.startswith('follower') for p in self.procs)}"
        return self._start(name, ["-m", "model_server", "--backend=jax", *flags])

    def _admin_id(self) -> str:
        try:
            return cell_layout.read_location(self.store, parse_cell(self.cell)).admin_id
        except Exception:  # noqa: BLE001 - no record yet
            return ""

    def close(self) -> None:
        for proc in self.procs:
            proc.kill(signal.SIGKILL)

    def logs(self, lines: int = 40) -> str:
        out = []
        for proc in self.procs:
            text = proc.log.read_text(errors="replace").splitlines() if proc.log.exists() else []
            out.append(f"----- {proc.name} ({proc.address}) -----")
            out.extend(text[-lines:])
        return "\n".join(out)

    # ------------------------------------------------------------------ tools

    def saxutil(self, *args: str, timeout: float = 60, stdin: str | None = None):
        """Runs the saxutil console script; returns the CompletedProcess (text)."""
        exe = Path(sys.executable).parent / "saxutil"
        return subprocess.run(
            [str(exe), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            cwd=REPO,
        )

    def admin_stub(self) -> admin_pb2_grpc.AdminStub:
        loc = cell_layout.read_location(self.store, parse_cell(self.cell)).location
        return admin_pb2_grpc.AdminStub(grpc.insecure_channel(loc))

    def server_addresses(self) -> set[str]:
        resp = self.admin_stub().Stats(admin_pb2.StatsRequest(), timeout=5)
        return {s.address for s in resp.servers}

    def ready_addresses(self, model_id: str) -> list[str]:
        resp = self.admin_stub().List(admin_pb2.ListRequest(model_id=model_id), timeout=5)
        return list(resp.published_models[0].modelet_addresses)

    @staticmethod
    def server_status(address: str) -> modelet_pb2.GetStatusResponse:
        with grpc.insecure_channel(address) as channel:
            return modelet_pb2_grpc.ModeletStub(channel).GetStatus(
                modelet_pb2.GetStatusRequest(), timeout=5
            )
