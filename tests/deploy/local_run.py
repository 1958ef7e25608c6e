"""Runs the images' and the compose services' command lines outside Docker, on 127.0.0.1.

`localize` turns a container's command line into one for this machine: the same entry point and
flags, with this Python, port 0 (or a given port), a free --metrics_port (0 would turn metrics
off) and 127.0.0.1 for --host and --advertise_host.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def localize(argv: list[str], port: int = 0) -> list[str]:
    """The command line on this machine: python is this interpreter, saxutil the one beside it,
    --port is `port`, a set --metrics_port a free port, and the servers listen and advertise
    127.0.0.1."""
    out = list(argv)
    if os.path.basename(out[0]).startswith("python"):
        out[0] = sys.executable
    elif out[0] == "saxutil":
        out[0] = str(BIN / "saxutil")
    for i, arg in enumerate(out):
        if arg.startswith("--port="):
            out[i] = f"--port={port}"
        elif arg.startswith("--metrics_port=") and arg != "--metrics_port=0":
            out[i] = f"--metrics_port={free_port()}"
        elif arg.startswith(("--host=", "--advertise_host=")):
            out[i] = arg.split("=", 1)[0] + "=127.0.0.1"
    if len(out) > 2 and out[1] == "-m" and not any(a.startswith("--host=") for a in out):
        out.append("--host=127.0.0.1")
    return out


def environment(extra: dict[str, str]) -> dict[str, str]:
    """os.environ with this virtualenv first on PATH, this checkout importable, and `extra`."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Polls `predicate` until it returns a truthy value; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


@dataclass
class Process:
    """A started command, logging to `log`; `grace_s` is how long its platform waits after
    SIGTERM before it kills it (compose's stop_grace_period, Docker's 10 s default)."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path
    grace_s: float

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def address(self, timeout: float = 30) -> str:
        """The "host:port" or URL the process logs as "listening on ..."."""

        def logged() -> str:
            assert self.alive(), f"{self.name} exited:\n{self.output()}"
            m = re.search(r"listening on (\S+)", self.output())
            return m.group(1) if m else ""

        return wait_for(logged, timeout, f"{self.name} to listen")

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, then waits up to grace_s; returns (exit status, seconds it took). A process
        still running at the end of its grace period is killed and reported as -9."""
        start = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            rc = self.popen.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            rc = -9
        return rc, time.monotonic() - start


class Processes:
    """Processes started for one test; everything still running is killed at `close()`."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[Process] = []

    def start(
        self, name: str, argv: list[str], grace_s: float = 10.0, env: dict[str, str] | None = None
    ) -> Process:
        """Starts `argv` with this test's environment plus `env`, logging to NAME.log."""
        log = self.workdir / f"{name}.log"
        with log.open("ab") as f:
            popen = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env={**self.env, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        proc = Process(name, argv, popen, log, grace_s)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Runs `argv` to the end (text output captured)."""
        return subprocess.run(
            argv,
            cwd=self.workdir,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        return "\n".join(f"----- {p.name}: {p.argv}\n{p.output()[-3000:]}" for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.kill()
                proc.popen.wait()
