"""One model over several processes (hosts) with `jax.distributed`, and JAX's device set-up.

Every process of a multi-process mesh must run every compiled step, in the same order. Process
0 is the model server: it joins the cell, serves gRPC and runs the engine. The other processes
("followers") run `follow`: they connect to process 0's control port and make, on their own
runner, each call process 0's runner makes (load, prefill, decode, copy_slot, close).

Control channel: a TCP connection per follower to process 0 (`--jax_control_port`, default the
coordinator's port + 1). Messages are JSON objects, each preceded by its length (4 bytes, big
endian). Process 0 sends a call, runs it itself, then reads one reply per follower
(`{"ok": true}` or `{"error": "..."}`); a load is two-phase: the followers first open the
checkpoint and reply, then process 0 sends "go" (or "abort" when one failed) and everyone
builds. One lock orders every call of every model, so all processes see the same sequence.
A follower that disconnects makes later calls fail with UNAVAILABLE; a follower whose process 0
goes away without saying "shutdown" exits with status 1. Restart every process of the server.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import socket
import struct
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model_server.params import platform
from sax.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
)

if TYPE_CHECKING:
    from model_server.engine.jax_runner import JaxRunner
    from model_server.params.llama import LlamaConfig

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class MultihostConfig:
    """The processes of one multi-process model server."""

    # "host:port" of the jax.distributed coordinator (process 0's host).
    coordinator: str
    # Processes in all (>= 2).
    num_processes: int
    # This process, 0 (the server) .. num_processes - 1 (followers).
    process_id: int
    # Port of process 0's control channel; 0: the coordinator's port + 1.
    control_port: int = 0

    def control_address(self) -> tuple[str, int]:
        """(host, port) of process 0's control channel."""
        host, _, port = self.coordinator.rpartition(":")
        return host.strip("[]"), self.control_port or int(port) + 1

    def validate(self) -> None:
        """INVALID_ARGUMENT for a malformed setting."""
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgumentError(
                f"--jax_coordinator must be host:port, got {self.coordinator!r}"
            )
        if self.num_processes < 2 or not 0 <= self.process_id < self.num_processes:
            raise InvalidArgumentError(
                f"--jax_num_processes must be >= 2 and --jax_process_id in [0, num_processes), "
                f"got {self.num_processes} and {self.process_id}"
            )


def initialize(
    chip: str, topology: str, multihost: MultihostConfig | None = None, cache_dir: str = ""
) -> None:
    """Sets JAX up before its first use: the CPU device count of a "cpu" platform (the
    topology's devices split over the processes, unless XLA_FLAGS sets it), gloo collectives
    across CPU processes, `jax.distributed.initialize`, the compilation cache. FAILED_PRECONDITION
    when JAX then sees fewer devices than the topology has."""
    import jax

    devices = platform.num_devices(topology)
    processes = multihost.num_processes if multihost else 1
    if chip == "cpu":
        if devices % processes:
            raise InvalidArgumentError(
                f"--platform_topology {topology} ({devices} devices) does not split evenly over "
                f"{processes} processes"
            )
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", devices // processes)
        if multihost:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if multihost:
        try:
            jax.distributed.initialize(
                coordinator_address=multihost.coordinator,
                num_processes=multihost.num_processes,
                process_id=multihost.process_id,
            )
        except Exception as e:  # e.g. coordinator unreachable, or a process id already taken
            raise UnavailableError(
                f"jax.distributed could not start (process {multihost.process_id} of "
                f"{multihost.num_processes}, coordinator {multihost.coordinator}): "
                f"{type(e).__name__}: {' '.join(str(e).split())}"
            ) from e
    from model_server.engine import jax_runner

    jax_runner.configure(cache_dir)
    found = jax.device_count()
    if found < devices:
        raise FailedPreconditionError(
            f"--platform_topology {topology} needs {devices} devices, JAX sees {found} "
            f"({jax.devices()[0].platform}); fix the topology or the slice"
        )
    logger.info(
        "JAX: %d devices (%d on this process %d of %d)",
        found,
        jax.local_device_count(),
        jax.process_index(),
        processes,
    )


# ---------------------------------------------------------------------------- messages


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("the peer closed the control channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    return dict(json.loads(_recv_exact(sock, size)))


def encode_config(config: Any) -> dict[str, Any]:
    """A servable config as JSON: its class and every field."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (tuple, frozenset)):
            value = sorted(value) if isinstance(value, frozenset) else list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        fields[f.name] = value
    cls = type(config)
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def decode_config(data: Mapping[str, Any]) -> Any:
    """The config `encode_config` wrote."""
    module, _, name = str(data["type"]).partition(":")
    cls = getattr(importlib.import_module(module), name)
    base = cls()
    changes: dict[str, Any] = {}
    for key, value in data["fields"].items():
        current = getattr(base, key)
        if isinstance(current, tuple):
            value = tuple(value)
        elif isinstance(current, frozenset):
            value = frozenset(value)
        elif isinstance(current, Mapping):
            value = types.MappingProxyType(dict(value))
        elif isinstance(current, float):
            value = float(value)
        changes[key] = value
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------- process 0


class Leader:
    """Process 0's end of the control channel: sends each call to every follower."""

    def __init__(self, config: MultihostConfig, timeout_s: float = _CONNECT_TIMEOUT_S) -> None:
        host, port = config.control_address()
        self._lock = threading.Lock()
        self._followers: list[tuple[int, socket.socket]] = []
        # Why the channel to the followers broke ("" while it works). A broken channel cannot
        # be mended (a restarted follower cannot rejoin a running jax.distributed job): the
        # server reports it as NOT_SERVING so that every process gets restarted.
        self.lost = ""
        listener = socket.create_server((host, port), reuse_port=False)
        listener.settimeout(timeout_s)
        logger.info(
            "waiting for %d follower process(es) on %s:%d", config.num_processes - 1, host, port
        )
        try:
            while len(self._followers) < config.num_processes - 1:
                try:
                    conn, _ = listener.accept()
                except TimeoutError as e:
                    raise UnavailableError(
                        f"only {len(self._followers)} of {config.num_processes - 1} follower "
                        f"processes connected to {host}:{port} in {timeout_s:.0f} s"
                    ) from e
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hello = _recv(conn)
                self._followers.append((int(hello["process_id"]), conn))
        finally:
            listener.close()
        logger.info("follower processes %s connected", sorted(p for p, _ in self._followers))

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        try:
            for _, conn in self._followers:
                _send(conn, message)
        except OSError as e:
            raise self._lose(e) from e

    def _lose(self, e: BaseException) -> UnavailableError:
        error = UnavailableError(
            f"a follower process is gone ({e}); restart every process of this server"
        )
        if not self.lost:
            logger.error("%s", error)
        self.lost = str(error)
        return error

    def _replies(self) -> list[str]:
        """Errors reported by followers for the last message ([] when all succeeded)."""
        errors = []
        try:
            for process, conn in self._followers:
                reply = _recv(conn)
                if "error" in reply:
                    errors.append(f"process {process}: {reply['error']}")
        except (OSError, ConnectionError, ValueError) as e:
            raise self._lose(e) from e
        return errors

    def _run_then_replies(self, op: str, local: Callable[[], Any]) -> tuple[Any, list[str]]:
        """Runs `local`, then reads the followers' replies. When `local` fails, its error is
        raised and what the followers report (errors, or a lost channel) is only logged."""
        try:
            result = local()
        except BaseException:
            try:
                errors = self._replies()
            except UnavailableError as e:
                errors = [str(e)]
            if errors:
                logger.error("%s also failed on followers: %s", op, "; ".join(errors))
            raise
        return result, self._replies()

    def step(self, message: Mapping[str, Any], local: Callable[[], Any]) -> Any:
        """Sends `message` to every follower, runs `local` here, waits for their replies."""
        op = str(message.get("op"))
        with self._lock:
            self._broadcast(message)
            result, errors = self._run_then_replies(op, local)
            if errors:
                raise InternalError(f"{op} failed on " + "; ".join(errors))
            return result

    def load(
        self,
        runner_id: int,
        config: LlamaConfig,
        checkpoint_path: str,
        num_slots: int | None,
        build: Callable[[], JaxRunner],
    ) -> JaxRunner:
        """Builds a runner on every process (see the module docs)."""
        message = {
            "op": "load",
            "id": runner_id,
            "config": encode_config(config),
            "checkpoint": checkpoint_path,
            "num_slots": num_slots,
        }
        with self._lock:
            self._broadcast(message)
            errors = self._replies()
            self._broadcast({"op": "abort" if errors else "go"})
            if errors:
                raise FailedPreconditionError("loading failed on " + "; ".join(errors))
            runner, errors = self._run_then_replies("load", build)
            if errors:
                raise InternalError("loading failed on " + "; ".join(errors))
            return runner

    def close(self) -> None:
        """Tells the followers to exit and closes the channel."""
        with self._lock:
            for _, conn in self._followers:
                try:
                    _send(conn, {"op": "shutdown"})
                    conn.close()
                except OSError:
                    pass
            self._followers = []


_leader: Leader | None = None


def current_leader() -> Leader | None:
    """The control channel of process 0 of a multi-process server, else None."""
    return _leader


def start_leader(config: MultihostConfig) -> Leader:
    """Waits for every follower to connect (process 0, before serving)."""
    global _leader
    _leader = Leader(config)
    return _leader


def stop_leader() -> None:
    """Releases the followers (they exit)."""
    global _leader
    leader, _leader = _leader, None
    if leader is not None:
        leader.close()


# ---------------------------------------------------------------------------- followers


def _connect(config: MultihostConfig, timeout_s: float) -> socket.socket:
    host, port = config.control_address()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"cannot reach process 0's control port {host}:{port} ({e})"
                ) from e
            time.sleep(0.2)


def follow(config: MultihostConfig, timeout_s: float = _CONNECT_TIMEOUT_S) -> int:
    """Runs process 0's calls on this process until it says to stop (returns 0) or goes away
    (returns 1: the whole server must be restarted)."""
    sock = _connect(config, timeout_s)
    runners: dict[int, JaxRunner] = {}
    try:
        _send(sock, {"process_id": config.process_id})
        logger.info("process %d following %s", config.process_id, config.control_address())
        _follow_calls(sock, runners)
        status = 0
    except OSError as e:  # ConnectionError included
        logger.error("process 0 closed the control channel (%s); stopping", e)
        status = 1
    for runner in runners.values():
        runner.close()
    sock.close()
    return status


def _follow_calls(sock: socket.socket, runners: dict[int, Any]) -> None:
    """Runs process 0's calls until it says to stop; OSError when the channel breaks."""
    while True:
        message = _recv(sock)
        op = message.get("op")
        if op == "shutdown":
            return
        if op == "load":
            _follow_load(sock, message, runners)
            continue
        try:
            runner = runners[message["id"]]
            if op == "prefill":
                runner.prefill(message["slot"], message["tokens"], all_logits=message["all_logits"])
            elif op == "decode":
                runner.decode(message["slots"], message["tokens"], message["positions"])
            elif op == "copy_slot":
                runner.copy_slot(message["src"], message["dst"], message["length"])
            elif op == "close":
                runners.pop(message["id"]).close()
            else:
                raise InvalidArgumentError(f"unknown control message {op!r}")
        except Exception as e:
            logger.exception("%s failed", op)
            reply: dict[str, Any] = {"error": f"{type(e).__name__}: {e}"}
        else:
            reply = {"ok": True}
        _send(sock, reply)


def _follow_load(sock: socket.socket, message: Mapping[str, Any], runners: dict[int, Any]) -> None:
    """Both phases of a load on a follower."""
    from model_server.checkpoint import open_checkpoint
    from model_server.engine import jax_runner
    from model_server.models import check_architecture

    try:
        config = decode_config(message["config"])
        ckpt = open_checkpoint(message["checkpoint"])
        check_architecture(config, ckpt.config, ckpt.path)
    except Exception as e:  # noqa: BLE001 - reported to process 0
        reply: dict[str, Any] = {"error": f"{type(e).__name__}: {e}"}
    else:
        reply = {"ok": True}
    _send(sock, reply)
    if _recv(sock).get("op") != "go" or "error" in reply:
        return
    try:
        runners[message["id"]] = jax_runner.build_jax_runner(config, ckpt, message.get("num_slots"))
    except Exception as e:
        logger.exception("load failed")
        reply = {"error": f"{type(e).__name__}: {e}"}
    else:
        reply = {"ok": True}
    _send(sock, reply)
