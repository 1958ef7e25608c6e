"""Prometheus metrics of a model server, served over HTTP with `--metrics_port`.

Call metrics (updated by the LM service):
- `sax_model_server_requests_total{method, code}`: finished LM calls by method ("Generate",
  "GenerateStream", "Score") and gRPC status code name ("OK", "UNAVAILABLE", ...).
- `sax_model_server_request_latency_seconds{method}`: end-to-end seconds of a call.
- `sax_model_server_time_to_first_token_seconds{method}`: seconds from a stream's start to its
  first item.
- `sax_model_server_time_per_output_token_seconds{method}`: seconds between a stream's items
  after the first (a stream item is one decode step).
- `sax_model_server_calls_in_flight`: LM calls running now.

Model metrics, read from the loaded models at scrape time, labelled `model` (the model key):
- `sax_model_server_model_load_seconds`: seconds the model's load took (weights read and placed).
Of models served by the batching engine:
- `sax_model_server_queue_depth`: requests waiting to start (or to resume).
- `sax_model_server_running_requests`: requests holding KV cache blocks.
- `sax_model_server_cache_slots_used` / `sax_model_server_cache_slots`: sequences running and
  the most that run at once.
- `sax_model_server_generated_tokens_total`: tokens sampled.
- `sax_model_server_kv_cache_blocks_used` / `sax_model_server_kv_cache_blocks`: KV cache blocks
  held by running sequences, and in all (cached prefixes nobody holds count as free).
- `sax_model_server_prefix_cache_queried_tokens_total` /
  `sax_model_server_prefix_cache_hit_tokens_total`: prompt tokens looked up in the prefix cache,
  and those found there (hit rate = hits / queried).
- `sax_model_server_preemptions_total`: requests preempted for want of KV cache blocks (each
  resumes later; none fails).
- `sax_model_server_spec_decode_draft_tokens_total` /
  `sax_model_server_spec_decode_accepted_tokens_total`: draft tokens of speculating requests
  checked by the model, and those it agreed with (acceptance rate = accepted / draft).

Every server has its own `CollectorRegistry`, so several servers can run in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sax.metrics_endpoint import MetricsEndpoint

if TYPE_CHECKING:  # the engine imports torch; a TinyLM-only server never does
    from model_server.engine.engine import EngineStats

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ModelSample(NamedTuple):
    """One loaded model as a scrape sees it."""

    # The model key, e.g. "/sax/test/tiny".
    key: str
    # Seconds its load took; None when unknown.
    load_seconds: float | None
    # Its engine's load; None when the model is not served by the batching engine.
    stats: EngineStats | None


# Lists the loaded models at scrape time.
ModelSource = Callable[[], Iterable[ModelSample]]


class _ModelCollector(Collector):
    """Gauges of every loaded model, read when scraped."""

    def __init__(self, source: ModelSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        load = GaugeMetricFamily(
            "sax_model_server_model_load_seconds",
            "Seconds the model's load took (weights read and placed).",
            labels=["model"],
        )
        waiting = GaugeMetricFamily(
            "sax_model_server_queue_depth", "Requests waiting for a cache slot.", labels=["model"]
        )
        running = GaugeMetricFamily(
            "sax_model_server_running_requests",
            "Requests holding KV cache slots.",
            labels=["model"],
        )
        used = GaugeMetricFamily(
            "sax_model_server_cache_slots_used", "KV cache slots in use.", labels=["model"]
        )
        total = GaugeMetricFamily(
            "sax_model_server_cache_slots", "KV cache slots of the model.", labels=["model"]
        )
        tokens = CounterMetricFamily(
            "sax_model_server_generated_tokens", "Tokens sampled.", labels=["model"]
        )
        blocks_used = GaugeMetricFamily(
            "sax_model_server_kv_cache_blocks_used",
            "KV cache blocks held by running sequences.",
            labels=["model"],
        )
        blocks = GaugeMetricFamily(
            "sax_model_server_kv_cache_blocks", "KV cache blocks of the model.", labels=["model"]
        )
        queried = CounterMetricFamily(
            "sax_model_server_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache.",
            labels=["model"],
        )
        hits = CounterMetricFamily(
            "sax_model_server_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (not prefilled again).",
            labels=["model"],
        )
        preemptions = CounterMetricFamily(
            "sax_model_server_preemptions",
            "Requests preempted for want of KV cache blocks (resumed later).",
            labels=["model"],
        )
        drafts = CounterMetricFamily(
            "sax_model_server_spec_decode_draft_tokens",
            "Draft tokens (prompt lookup) checked by the model.",
            labels=["model"],
        )
        accepted = CounterMetricFamily(
            "sax_model_server_spec_decode_accepted_tokens",
            "Draft tokens the model agreed with.",
            labels=["model"],
        )
        try:
            models = list(self._source())
        except Exception:  # a scrape must not fail for a model being unloaded
            logger.exception("reading the models' stats failed")
            models = []
        for key, load_seconds, stats in models:
            if load_seconds is not None:
                load.add_metric([key], load_seconds)
            if stats is None:
                continue
            waiting.add_metric([key], stats.waiting)
            running.add_metric([key], stats.running)
            used.add_metric([key], stats.slots - stats.free_slots)
            total.add_metric([key], stats.slots)
            tokens.add_metric([key], stats.tokens)
            blocks_used.add_metric([key], stats.blocks - stats.free_blocks)
            blocks.add_metric([key], stats.blocks)
            queried.add_metric([key], stats.prefix_queried_tokens)
            hits.add_metric([key], stats.prefix_hit_tokens)
            preemptions.add_metric([key], stats.preemptions)
            drafts.add_metric([key], stats.draft_tokens)
            accepted.add_metric([key], stats.accepted_tokens)
        yield from (load, waiting, running, used, total, tokens, blocks_used, blocks)
        yield from (queried, hits, preemptions, drafts, accepted)


class ModelServerMetrics(MetricsEndpoint):
    """The collectors of one model server, in their own registry."""

    def __init__(self, models: ModelSource, in_flight: Callable[[], float]) -> None:
        """`models` lists the loaded models at scrape time; `in_flight` counts the LM calls
        running."""
        super().__init__()
        self.requests = Counter(
            "sax_model_server_requests",
            "LM calls finished, by method and gRPC status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "sax_model_server_request_latency_seconds",
            "End-to-end seconds of an LM call, by method.",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "sax_model_server_time_to_first_token_seconds",
            "Seconds from the start of a streamed call to its first item.",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "sax_model_server_time_per_output_token_seconds",
            "Seconds between two items of a streamed call (one decode step), after the first.",
            ("method",),
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "sax_model_server_calls_in_flight", "LM calls running now.", registry=self.registry
        )
        self.in_flight.set_function(in_flight)
        self.registry.register(_ModelCollector(models))

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        """Counts one finished call and its latency."""
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)
