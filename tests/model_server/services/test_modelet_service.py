"""Modelet RPCs (Load, Unload, GetStatus) over gRPC on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from model_server.server import ModelServer
from sax.v1 import common_pb2, modelet_pb2, modelet_pb2_grpc

Status = common_pb2.ModelStatus


def load(stub: modelet_pb2_grpc.ModeletStub, key: str, path: str = "test.TinyLM", **kw: object):
    request = modelet_pb2.LoadRequest(
        model_key=key, model_path=path, checkpoint_path=str(kw.pop("checkpoint", "None")), **kw
    )
    return stub.Load(request, timeout=30)


def status(stub: modelet_pb2_grpc.ModeletStub) -> modelet_pb2.GetStatusResponse:
    return stub.GetStatus(modelet_pb2.GetStatusRequest(include_failure_reasons=True), timeout=10)


def model(stub: modelet_pb2_grpc.ModeletStub, key: str) -> modelet_pb2.ModelWithStatus | None:
    return next((m for m in status(stub).models if m.model_key == key), None)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_load_status_unload_and_counters(modelet: modelet_pb2_grpc.ModeletStub) -> None:
    key = "/sax/test/lifecycle"
    before = status(modelet)
    load(modelet, key, overrides={"NUM_SAMPLES": "3"})
    m = model(modelet, key)
    assert m is not None
    assert m.model_status == Status.LOADED
    assert (m.model_path, m.checkpoint_path) == ("test.TinyLM", "None")
    assert list(m.method_names) == ["lm.generate", "lm.generate_stream", "lm.score"]
    assert dict(m.overrides) == {"NUM_SAMPLES": "3"}
    after_load = status(modelet)
    assert after_load.total_loads == before.total_loads + 1
    assert after_load.server_id == before.server_id != ""

    load(modelet, key, overrides={"NUM_SAMPLES": "3"})  # same settings: a no-op
    assert status(modelet).total_loads == after_load.total_loads

    modelet.Unload(modelet_pb2.UnloadRequest(model_key=key), timeout=10)
    after_unload = status(modelet)
    assert model(modelet, key) is None
    assert after_unload.total_unloads == before.total_unloads + 1
    assert code_of(lambda: modelet.Unload(modelet_pb2.UnloadRequest(model_key=key))) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_unknown_config_is_not_found_and_failed(modelet: modelet_pb2_grpc.ModeletStub) -> None:
    key = "/sax/test/unknown"
    assert code_of(lambda: load(modelet, key, "test.NoSuchLM")) == grpc.StatusCode.NOT_FOUND
    m = model(modelet, key)
    assert m is not None and m.model_status == Status.FAILED
    assert "test.NoSuchLM" in m.failure_reason and "test.TinyLM" in m.failure_reason
    quiet = modelet.GetStatus(modelet_pb2.GetStatusRequest(), timeout=10)
    assert next(x for x in quiet.models if x.model_key == key).failure_reason == ""
    # A failed model can be retried with good settings.
    load(modelet, key)
    m = model(modelet, key)
    assert m is not None and m.model_status == Status.LOADED and m.failure_reason == ""
    modelet.Unload(modelet_pb2.UnloadRequest(model_key=key), timeout=10)


def test_bad_override_is_invalid_argument(modelet: modelet_pb2_grpc.ModeletStub) -> None:
    key = "/sax/test/badoverride"
    for overrides in ({"NO_SUCH_KEY": "1"}, {"NUM_SAMPLES": '"two"'}, {"NUM_SAMPLES": "0"}):
        assert code_of(lambda o=overrides: load(modelet, key, overrides=o)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        m = model(modelet, key)
        assert m is not None and m.model_status == Status.FAILED
    modelet.Unload(modelet_pb2.UnloadRequest(model_key=key), timeout=10)


def test_checkpoint_none_needs_a_test_mode_config(modelet: modelet_pb2_grpc.ModeletStub) -> None:
    key = "/sax/test/notest"
    code = code_of(lambda: load(modelet, key, overrides={"test_mode": "false"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    m = model(modelet, key)
    assert m is not None and "checkpoint" in m.failure_reason
    modelet.Unload(modelet_pb2.UnloadRequest(model_key=key), timeout=10)


def test_platform_mismatch_is_failed_precondition(
    start_server: Callable[..., ModelServer], modelet: modelet_pb2_grpc.ModeletStub
) -> None:
    # A 1-device config on a 4-device server.
    four = start_server(topology="4")
    with grpc.insecure_channel(four.address) as ch:
        stub = modelet_pb2_grpc.ModeletStub(ch)
        assert code_of(lambda: load(stub, "/sax/test/p")) == grpc.StatusCode.FAILED_PRECONDITION
        m = model(stub, "/sax/test/p")
        assert m is not None and "topology 4" in m.failure_reason
    # A 4-device mesh on a 1-device server.
    code = code_of(lambda: load(modelet, "/sax/test/p4", overrides={"ICI_MESH_SHAPE": "[1,1,4]"}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    modelet.Unload(modelet_pb2.UnloadRequest(model_key="/sax/test/p4"), timeout=10)


def test_load_needs_key_and_path(modelet: modelet_pb2_grpc.ModeletStub) -> None:
    assert code_of(lambda: load(modelet, "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: load(modelet, "/sax/test/x", "")) == grpc.StatusCode.INVALID_ARGUMENT
