"""Readiness follows progress: a model server whose engine has requests but finishes no step for
`stall_timeout_s` turns NOT_SERVING with the reason in GetStatus, and SERVING again once tokens
flow. The engine runs over the gated fake runner, on a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_server.engine.engine_servable import EngineServable
from model_server.engine.tokenizer import Tokenizer
from model_server.server import ModelServer
from sax.v1 import lm_pb2, lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc
from servables.servable_config import ServableConfig
from tests.model_server.conftest import wait_for
from tests.model_server.engine.fakes import FakeRunner, write_tokenizer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KEY = "/sax/test/gated"
STALL_S = 1.0


@pytest.fixture(scope="module")
def gate() -> threading.Semaphore:
    return threading.Semaphore(0)


@pytest.fixture(scope="module")
def server(
    start_server: Callable[..., ModelServer],
    gate: threading.Semaphore,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ModelServer]:
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))

    def build(config: ServableConfig, checkpoint: str) -> EngineServable:
        runner = FakeRunner(num_slots=1, max_seq_len=56, gate=gate)
        return EngineServable(config, runner, tokenizer)

    server = start_server(builder=build, stall_timeout_s=STALL_S)
    with grpc.insecure_channel(server.address) as ch:
        modelet_pb2_grpc.ModeletStub(ch).Load(
            modelet_pb2.LoadRequest(
                model_key=KEY,
                model_path="llama.SmolLM2_135M",
                checkpoint_path="gated",
                overrides={"INPUT_SEQ_LEN": "32", "MAX_DECODE_STEPS": "24", "BUCKET_KEYS": "[32]"},
            ),
            timeout=30,
        )
    yield server
    gate.release(1000)


def _health(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def _reason(channel: grpc.Channel) -> str:
    stub = modelet_pb2_grpc.ModeletStub(channel)
    return stub.GetStatus(modelet_pb2.GetStatusRequest(), timeout=5).health_reason


def test_a_stalled_engine_turns_not_serving_until_tokens_flow(
    server: ModelServer, gate: threading.Semaphore, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(server.address) as ch:
        # Idle for several stall periods: no requests, no stall.
        time.sleep(3 * STALL_S)
        assert _health(ch) == SERVING and _reason(ch) == ""

        request = lm_pb2.GenerateRequest(model_key=KEY, text="abc")
        # Taken before the call: the engine's last progress (the prefill) comes after it, so
        # NOT_SERVING can only show STALL_S later, however late the first item reaches us.
        stalled_at = time.monotonic()
        stream = lm_pb2_grpc.LMServiceStub(ch).GenerateStream(request, timeout=60)
        assert next(stream).items  # prefilled; every decode now waits at the gate
        wait_for(lambda: _health(ch) == NOT_SERVING, timeout=15, what="NOT_SERVING")
        assert time.monotonic() - stalled_at >= STALL_S
        assert _health(ch, "sax.v1.LMService") == NOT_SERVING
        assert _health(ch, "sax.v1.Modelet") == SERVING  # the admin can still unload
        reason = _reason(ch)
        assert "stalled" in reason and KEY in reason and "1 requests running" in reason
        assert any("NOT_SERVING: stalled" in r.getMessage() for r in caplog.records)

        gate.release(1000)  # tokens flow again
        rest = list(stream)
        assert rest, "the stream went on once the engine stepped again"
        wait_for(lambda: _health(ch) == SERVING, timeout=15, what="SERVING again")
        assert _reason(ch) == ""
        assert _health(ch, "sax.v1.LMService") == SERVING


def test_slow_but_flowing_tokens_are_not_a_stall(
    server: ModelServer, gate: threading.Semaphore
) -> None:
    with grpc.insecure_channel(server.address) as ch:
        # Drain permits left by the previous test, then feed one decode step at a time, each
        # well within the stall timeout: a slow model is not a stalled one.
        while gate.acquire(blocking=False):
            pass
        request = lm_pb2.GenerateRequest(model_key=KEY, text="xyz")
        stream = lm_pb2_grpc.LMServiceStub(ch).GenerateStream(request, timeout=60)
        assert next(stream).items
        seen = []
        for _ in range(8):
            gate.release(1)
            next(stream)
            seen.append(_health(ch))
            time.sleep(STALL_S / 10)
        assert seen == [SERVING] * len(seen)
        gate.release(1000)
        list(stream)
