"""`python -m model_server` as a process: flags, serving, and a clean exit on SIGTERM."""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from sax import cell as sax_cell
from sax.naming import CellName
from sax.storage.local import LocalStore
from sax.v1 import modelet_pb2, modelet_pb2_grpc


def run_main(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_server", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_bad_flags_exit_2_with_one_line() -> None:
    for flags in (["--platform_chip=abacus"], ["--port=-4"], ["--nope"], ["--sax_cell=/sax/t"]):
        result = run_main(*flags)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m model_server: error:"), lines
    assert "sax_root" in run_main("--sax_cell=/sax/t").stderr
    assert "abacus" in run_main("--platform_chip=abacus").stderr
    for flag in ("--metrics_port=70000", "--stall_timeout_s=-1"):
        result = run_main(flag)
        assert result.returncode == 2 and flag.split("=")[0] in result.stderr, result.stderr


def test_metrics_and_stall_flags_reach_the_config() -> None:
    from model_server.__main__ import parse_config

    config, _ = parse_config(["--metrics_port=9100", "--stall_timeout_s=5"])
    assert (config.metrics_port, config.stall_timeout_s) == (9100, 5.0)
    config, _ = parse_config([])
    assert (config.metrics_port, config.stall_timeout_s) == (0, 30.0)


def test_serves_and_exits_cleanly_on_sigterm(
    tmp_path: pathlib.Path, poll: Callable[..., Any]
) -> None:
    sax_cell.create_cell(LocalStore(tmp_path / "root"), CellName("test"))
    log = tmp_path / "ms.log"
    grace = 3.0
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "model_server",
                "--port=0",
                "--host=127.0.0.1",
                "--sax_cell=/sax/test",
                f"--sax_root={tmp_path / 'root'}",
                "--join_period_s=0.1",
                f"--shutdown_grace_s={grace}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def listening() -> str:
            assert proc.poll() is None, log.read_text()
            m = re.search(r"model server listening on (\S+)", log.read_text())
            return m.group(1) if m else ""

        address = poll(listening, timeout=30, what="the server to listen")
        with grpc.insecure_channel(address) as ch:
            status = modelet_pb2_grpc.ModeletStub(ch).GetStatus(
                modelet_pb2.GetStatusRequest(), timeout=10
            )
        assert len(status.server_id) == 16 and not status.models
        # No admin has run for the cell: the server logs it and keeps serving.
        poll(lambda: "cannot join the admin of /sax/test" in log.read_text(), what="join retry")

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=grace + 10) == 0, log.read_text()
        assert time.monotonic() - start < grace + 2
        text = log.read_text()
        assert "stopped" in text
        assert text.count("cannot join") == 1
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
