"""The model server's Prometheus endpoint: scraped over HTTP after real calls on a real gRPC
server (a TinyLM and an engine model over the fake runner), the values follow the calls."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_server.engine.engine_servable import EngineServable
from model_server.engine.tokenizer import Tokenizer
from model_server.loader import build_servable
from model_server.servable import Servable
from model_server.server import ModelServer
from sax.v1 import lm_pb2, lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc
from servables.servable_config import ServableConfig
from tests.model_server.engine.fakes import FakeRunner, write_tokenizer

TINY = "/sax/test/tiny"
ENGINE = "/sax/test/engine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(
    start_server: Callable[..., ModelServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    tokenizer = Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))

    def build(config: ServableConfig, checkpoint: str) -> Servable:
        if checkpoint == "fake":
            runner = FakeRunner(num_slots=8, max_seq_len=56)
            return EngineServable(config, runner, tokenizer)
        return build_servable(config, checkpoint)

    server = start_server(builder=build, metrics_port=free_port())
    with grpc.insecure_channel(server.address) as ch:
        modelet = modelet_pb2_grpc.ModeletStub(ch)
        modelet.Load(
            modelet_pb2.LoadRequest(
                model_key=TINY, model_path="test.TinyLM", checkpoint_path="None"
            ),
            timeout=30,
        )
        modelet.Load(
            modelet_pb2.LoadRequest(
                model_key=ENGINE,
                model_path="llama.SmolLM2_135M",
                checkpoint_path="fake",
                overrides={"INPUT_SEQ_LEN": "32", "MAX_DECODE_STEPS": "8", "BUCKET_KEYS": "[32]"},
            ),
            timeout=30,
        )
    yield server


def test_the_endpoint_follows_the_calls(server: ModelServer) -> None:
    assert server.metrics_port == server.config.metrics_port
    before = scrape(server.metrics_port)
    assert value(before, "sax_model_server_cache_slots", model=ENGINE) == 8
    assert value(before, "sax_model_server_model_load_seconds", model=TINY) > 0
    assert value(before, "sax_model_server_model_load_seconds", model=ENGINE) > 0
    with grpc.insecure_channel(server.address) as ch:
        lm = lm_pb2_grpc.LMServiceStub(ch)
        for key in (TINY, ENGINE, ENGINE):
            lm.Generate(lm_pb2.GenerateRequest(model_key=key, text="hi"), timeout=30)
        for _ in range(2):
            items = list(
                lm.GenerateStream(lm_pb2.GenerateRequest(model_key=ENGINE, text="ab"), timeout=30)
            )
            assert len(items) >= 2
        lm.Score(lm_pb2.ScoreRequest(model_key=TINY, prefix="a", suffix=["b"]), timeout=30)
        with pytest.raises(grpc.RpcError):
            lm.Generate(lm_pb2.GenerateRequest(model_key="/sax/test/none", text="x"), timeout=30)
        with pytest.raises(grpc.RpcError):
            lm.Score(lm_pb2.ScoreRequest(model_key=TINY, prefix="a"), timeout=30)
    after = scrape(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "sax_model_server_requests_total"
    assert delta(requests, method="Generate", code="OK") == 3
    assert delta(requests, method="GenerateStream", code="OK") == 2
    assert delta(requests, method="Score", code="OK") == 1
    assert delta(requests, method="Generate", code="NOT_FOUND") == 1
    assert delta(requests, method="Score", code="INVALID_ARGUMENT") == 1
    latency = "sax_model_server_request_latency_seconds"
    assert delta(f"{latency}_count", method="Generate") == 4
    assert delta(f"{latency}_sum", method="Generate") > 0
    ttft = "sax_model_server_time_to_first_token_seconds_count"
    assert delta(ttft, method="GenerateStream") == 2
    tpot = "sax_model_server_time_per_output_token_seconds_count"
    assert delta(tpot, method="GenerateStream") >= 2
    assert delta("sax_model_server_generated_tokens_total", model=ENGINE) >= 4
    # Nothing is left running.
    assert value(after, "sax_model_server_calls_in_flight") == 0
    assert value(after, "sax_model_server_cache_slots_used", model=ENGINE) == 0
    # One KV cache block per slot here; none held once the calls are done.
    assert value(after, "sax_model_server_kv_cache_blocks", model=ENGINE) == 8
    assert value(after, "sax_model_server_kv_cache_blocks_used", model=ENGINE) == 0
    assert delta("sax_model_server_prefix_cache_queried_tokens_total", model=ENGINE) > 0
    assert value(after, "sax_model_server_prefix_cache_hit_tokens_total", model=ENGINE) == 0
    assert value(after, "sax_model_server_preemptions_total", model=ENGINE) == 0
    assert value(after, "sax_model_server_running_requests", model=ENGINE) == 0
    assert value(after, "sax_model_server_queue_depth", model=ENGINE) == 0


def test_two_servers_in_one_process_have_their_own_metrics(
    server: ModelServer, start_server: Callable[..., ModelServer]
) -> None:
    other = start_server(metrics_port=free_port())
    samples = scrape(other.metrics_port)
    assert value(samples, "sax_model_server_requests_total", method="Generate", code="OK") == 0
    assert value(samples, "sax_model_server_cache_slots", model=ENGINE) == 0
    assert value(scrape(server.metrics_port), "sax_model_server_cache_slots", model=ENGINE) == 8


def test_no_endpoint_without_a_port(start_server: Callable[..., ModelServer]) -> None:
    assert start_server().metrics_port == 0
