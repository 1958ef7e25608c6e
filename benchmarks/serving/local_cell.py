"""A cell on 127.0.0.1 for the benchmark: an admin and a model server as separate processes
(`python -m admin_server`, `python -m model_server`) on a local sax_root, as users run them."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

REPO = pathlib.Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Polls until predicate returns a truthy value; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


class LocalCell:
    """Admin + one CPU model server under `workdir`; `close` stops both."""

    def __init__(self, workdir: pathlib.Path, cell: str = "/sax/bench") -> None:
        self.workdir = workdir
        self.cell = cell
        self.root = str(workdir / "sax-root")
        self.env = {**os.environ, "SAX_ROOT": self.root, "PYTHONUNBUFFERED": "1"}
        self._procs: list[subprocess.Popen[bytes]] = []
        self.model_server_log = workdir / "model_server.log"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self._procs.append(proc)
        return proc

    def start(self) -> None:
        """Creates the cell, starts the admin, then the model server, and waits until the
        admin lists the model server."""
        import sax
        from sax import cell as cell_layout
        from sax.naming import parse_cell
        from sax.storage import open_store

        sax.SetSaxRoot(self.root)
        saxutil = pathlib.Path(sys.executable).parent / "saxutil"
        subprocess.run(
            [str(saxutil), "create", self.cell], env=self.env, check=True, capture_output=True
        )
        store = open_store(self.root)
        common = [f"--sax_cell={self.cell}", "--port=0", "--host=127.0.0.1"]
        admin = self._start("admin", ["-m", "admin_server", *common])

        def located() -> bool:
            if admin.poll() is not None:
                raise RuntimeError(f"the admin exited; see {self.workdir / 'admin.log'}")
            try:
                return bool(cell_layout.read_location(store, parse_cell(self.cell)).location)
            except Exception:  # noqa: BLE001 - no record yet
                return False

        wait_for(located, 60, "the admin's location record")
        server = self._start(
            "model_server",
            [
                "-m",
                "model_server",
                *common,
                "--platform_chip=cpu",
                "--platform_topology=1",
                "--join_period_s=0.5",
            ],
        )

        def joined() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"the model server exited; see {self.model_server_log}")
            try:
                return bool(sax.StatsDetail(self.cell, timeout=5).servers)
            except Exception:  # noqa: BLE001 - not joined yet
                return False

        wait_for(lambda: "listening on" in self._log(), 60, "the model server to listen")
        wait_for(joined, 60, "the model server to join")

    def _log(self) -> str:
        if not self.model_server_log.exists():
            return ""
        return self.model_server_log.read_text(errors="replace")

    def load_seconds(self, model_key: str) -> dict[str, float]:
        """What the model server logged about loading the model: build (checkpoint read and
        weight placement) and the whole load, seconds."""
        out = {}
        text = self._log()
        m = re.search(r"built \S+ from .* in ([0-9.]+) s", text)
        if m:
            out["build_s"] = float(m.group(1))
        m = re.search(rf"loaded {re.escape(model_key)} in ([0-9.]+)s", text)
        if m:
            out["load_s"] = float(m.group(1))
        return out

    def close(self) -> None:
        stop_processes(self._procs)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM to each process still running, then waits; kills one that outlives `grace`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
