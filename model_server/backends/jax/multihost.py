"""One model over several processes (hosts) with `jax.distributed`, and JAX's device set-up.

Every process of a multi-process mesh must run every compiled step, in the same order. Process
0 is the model server: it joins the cell, serves gRPC and runs the engine. The other processes
("followers") run `follow`: they connect to process 0's control port and make, on their own
runner, each call process 0's runner makes (load, prefill, decode, copy_slot, close).

Control channel: gRPC on process 0's control port (`--jax_control_port`, default the
coordinator's port + 1). Each follower opens one bidirectional stream (`Control/Follow`, a
generic handler: no .proto) whose messages are JSON objects as bytes: the follower's first
message names its process, then process 0 sends calls down the stream and the follower answers
each with one reply (`{"ok": true}` or `{"error": "..."}`). Process 0 sends a call, runs it
itself, then reads one reply per follower; a load is two-phase: the followers first open the
checkpoint and reply, then process 0 sends "go" (or "abort" when one failed) and everyone
builds. One lock orders every call of every model, so all processes see the same sequence.
A follower whose stream ends (it died, or its host went silent past the keepalive) makes
process 0 report the server broken and fail later calls with UNAVAILABLE; a follower whose
process 0 goes away without saying "shutdown" exits with status 1. Restart every process of the
server (a follower cannot rejoin a running `jax.distributed` job).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import queue
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from sax.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
)
from servables import platform
from servables.checkpoint import Checkpoint, open_checkpoint
from servables.servable_config import check_checkpoint

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 600.0
# Seconds process 0 gives the streams to deliver "shutdown" when it closes.
_CLOSE_GRACE_S = 5.0
_METHOD = "/sax.jax.Control/Follow"
# Both ends ping an idle stream, so that a host gone silent (no FIN) ends it too.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
_SERVER_OPTIONS = [
    *_KEEPALIVE,
    ("grpc.so_reuseport", 0),  # a second server on the same port fails instead of sharing it
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
# A follower started before process 0 listens retries every 0.2 to 1 s.
_CLIENT_OPTIONS = [
    *_KEEPALIVE,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

R = TypeVar("R")


class FollowerRunner(Protocol):
    """The runner calls a follower repeats (`jax_runner.JaxRunner` has them)."""

    def prefill_logits(self, slot: int, tokens: Sequence[int], *, all_logits: bool = True) -> Any:
        """Runs a prompt into a slot."""
        ...

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> Any:
        """Runs one decode step of several slots."""
        ...

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copies a slot's K/V positions to another slot."""
        ...

    def close(self) -> None:
        """Frees the runner's device memory."""
        ...


# Builds a follower's runner: (servable config, opened checkpoint, num_slots or None).
BuildRunner = Callable[[Any, Checkpoint, "int | None"], FollowerRunner]


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
    from model_server.backends.jax.jax_mesh import configure

    configure(cache_dir)
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


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _dumps(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _loads(data: bytes) -> dict[str, Any]:
    return dict(json.loads(data))


def _error(e: BaseException) -> dict[str, Any]:
    return {"error": f"{type(e).__name__}: {e}"}


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


@dataclass
class _Follower:
    """One follower's stream, as process 0 holds it."""

    process: int
    # The follower's replies, in order (read only under the leader's call lock).
    replies: Iterator[bytes]
    # Messages to send down the stream; None ends it.
    outbox: queue.SimpleQueue[bytes | None]


class Leader:
    """Process 0's end of the control channel: sends each call to every follower."""

    def __init__(self, config: MultihostConfig, timeout_s: float = _CONNECT_TIMEOUT_S) -> None:
        host, port = config.control_address()
        self._expected = config.num_processes - 1
        self._lock = threading.Lock()  # orders the calls of all runners
        self._state = threading.Condition()  # guards the fields below
        self._followers: dict[int, _Follower] = {}
        self._closing = False
        # Why the channel to the followers broke ("" while it works). A broken channel cannot
        # be mended (a restarted follower cannot rejoin a running jax.distributed job): the
        # server reports it as NOT_SERVING so that every process gets restarted.
        self.lost = ""
        handler = grpc.method_handlers_generic_handler(
            _METHOD.split("/")[1], {"Follow": grpc.stream_stream_rpc_method_handler(self._serve)}
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(self._expected + 2, thread_name_prefix="jax-control"),
            handlers=[handler],
            options=_SERVER_OPTIONS,
        )
        try:
            self._server.add_insecure_port(_target(host, port))
        except RuntimeError as e:
            raise UnavailableError(f"cannot listen on the control port {host}:{port} ({e})") from e
        self._server.start()
        logger.info("waiting for %d follower process(es) on %s:%d", self._expected, host, port)
        with self._state:
            self._state.wait_for(
                lambda: len(self._followers) == self._expected or bool(self.lost), timeout_s
            )
            joined, lost = len(self._followers), self.lost
        if joined < self._expected or lost:
            self._server.stop(None)
            raise UnavailableError(
                lost
                or f"only {joined} of {self._expected} follower processes connected to "
                f"{host}:{port} in {timeout_s:.0f} s"
            )
        logger.info("follower processes %s connected", sorted(self._followers))

    def _serve(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One follower's stream: its first message names it, then the calls go down."""
        try:
            process = int(_loads(next(requests))["process_id"])
        except (StopIteration, grpc.RpcError, ValueError, KeyError, TypeError):
            return
        follower = _Follower(process, requests, queue.SimpleQueue())
        with self._state:
            full = self._closing or len(self._followers) >= self._expected
            if full or process in self._followers:
                refused = (
                    f"process {process} cannot join: the server's {self._expected} follower "
                    f"processes are {sorted(self._followers)}; restart every process of the server"
                )
            else:
                refused = ""
                self._followers[process] = follower
                self._state.notify_all()
        if refused:
            logger.error("%s", refused)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused)
        if not context.add_callback(lambda: self._ended(follower)):
            self._ended(follower)
        while (message := follower.outbox.get()) is not None:
            yield message

    def _ended(self, follower: _Follower) -> None:
        """A follower's stream is over: expected when closing, else the channel is lost."""
        follower.outbox.put(None)
        with self._state:
            if not self._closing:
                self._lose(f"process {follower.process} disconnected")
                self._state.notify_all()

    def _lose(self, why: str) -> UnavailableError:
        if not self.lost:
            self.lost = f"a follower process is gone ({why}); restart every process of this server"
            logger.error("%s", self.lost)
        return UnavailableError(self.lost)

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        if self.lost:
            raise UnavailableError(self.lost)
        data = _dumps(message)
        for follower in self._followers.values():
            follower.outbox.put(data)

    def _replies(self) -> list[str]:
        """Errors reported by followers for the last message ([] when all succeeded)."""
        errors = []
        for process, follower in sorted(self._followers.items()):
            try:
                reply = _loads(next(follower.replies))
            except (StopIteration, grpc.RpcError, ValueError) as e:
                raise self._lose(f"process {process} disconnected") from e
            if "error" in reply:
                errors.append(f"process {process}: {reply['error']}")
        return errors

    def _run_then_replies(self, op: str, local: Callable[[], R]) -> tuple[R, list[str]]:
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

    def step(self, message: Mapping[str, Any], local: Callable[[], R]) -> R:
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
        config: Any,
        checkpoint_path: str,
        num_slots: int | None,
        build: Callable[[], R],
    ) -> R:
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
        """Tells the followers to exit and stops the control server."""
        with self._lock:
            with self._state:
                self._closing = True
                followers, self._followers = list(self._followers.values()), {}
            for follower in followers:
                follower.outbox.put(_dumps({"op": "shutdown"}))
                follower.outbox.put(None)
            self._server.stop(_CLOSE_GRACE_S).wait(_CLOSE_GRACE_S + 1)


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


class FollowerChannel:
    """A follower's end of the control channel: process 0's calls in, this process's replies
    out. ConnectionError from `receive` once process 0 has gone away."""

    def __init__(self, config: MultihostConfig, timeout_s: float = _CONNECT_TIMEOUT_S) -> None:
        host, port = config.control_address()
        self._channel = grpc.insecure_channel(_target(host, port), options=_CLIENT_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as e:
            self._channel.close()
            raise UnavailableError(
                f"cannot reach process 0's control port {host}:{port} in {timeout_s:.0f} s"
            ) from e
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._outbox.put(_dumps({"process_id": config.process_id}))
        follow_stream = self._channel.stream_stream(_METHOD)
        self._calls = follow_stream(iter(self._outbox.get, None))

    def receive(self) -> dict[str, Any]:
        """Process 0's next message (blocks)."""
        try:
            return _loads(next(self._calls))
        except StopIteration as e:
            raise ConnectionError("the stream ended without a shutdown") from e
        except grpc.RpcError as e:
            raise ConnectionError(f"{e.code().name}: {e.details()}") from e  # type: ignore[attr-defined]

    def send(self, message: Mapping[str, Any]) -> None:
        """Queues a reply to process 0."""
        self._outbox.put(_dumps(message))

    def close(self) -> None:
        """Ends the stream and the connection."""
        self._outbox.put(None)
        self._calls.cancel()  # type: ignore[attr-defined]
        self._channel.close()


def follow(
    config: MultihostConfig, build: BuildRunner, timeout_s: float = _CONNECT_TIMEOUT_S
) -> int:
    """Runs process 0's calls on this process, with runners made by `build`
    (`jax_runner.build_jax_runner`), until process 0 says to stop (returns 0) or goes away
    (returns 1: the whole server must be restarted). UNAVAILABLE when process 0 cannot be
    reached in timeout_s."""
    channel = FollowerChannel(config, timeout_s)
    runners: dict[int, FollowerRunner] = {}
    try:
        logger.info("process %d following %s", config.process_id, config.control_address())
        _follow_calls(channel, runners, build)
        status = 0
    except ConnectionError as e:
        logger.error("process 0 closed the control channel (%s); stopping", e)
        status = 1
    for runner in runners.values():
        runner.close()
    channel.close()
    return status


def _follow_calls(
    channel: FollowerChannel, runners: dict[int, FollowerRunner], build: BuildRunner
) -> None:
    """Runs process 0's calls until it says to stop; ConnectionError when the channel breaks."""
    while True:
        message = channel.receive()
        op = message.get("op")
        if op == "shutdown":
            return
        if op == "load":
            _follow_load(channel, message, runners, build)
            continue
        try:
            runner = runners[message["id"]]
            if op == "prefill":
                runner.prefill_logits(
                    message["slot"], message["tokens"], all_logits=message["all_logits"]
                )
            elif op == "decode":
                runner.decode_logits(message["slots"], message["tokens"], message["positions"])
            elif op == "copy_slot":
                runner.copy_slot(message["src"], message["dst"], message["length"])
            elif op == "close":
                runners.pop(message["id"]).close()
            else:
                raise InvalidArgumentError(f"unknown control message {op!r}")
        except Exception as e:
            logger.exception("%s failed", op)
            reply = _error(e)
        else:
            reply = {"ok": True}
        channel.send(reply)


def _follow_load(
    channel: FollowerChannel,
    message: Mapping[str, Any],
    runners: dict[int, FollowerRunner],
    build: BuildRunner,
) -> None:
    """Both phases of a load on a follower."""
    try:
        config = decode_config(message["config"])
        ckpt = open_checkpoint(message["checkpoint"])
        check_checkpoint(config, ckpt.config, ckpt.path)
    except Exception as e:  # noqa: BLE001 - reported to process 0
        reply = _error(e)
    else:
        reply = {"ok": True}
    channel.send(reply)
    if channel.receive().get("op") != "go" or "error" in reply:
        return
    try:
        runners[message["id"]] = build(config, ckpt, message.get("num_slots"))
    except Exception as e:
        logger.exception("load failed")
        reply = _error(e)
    else:
        reply = {"ok": True}
    channel.send(reply)
