"""Prometheus metrics of an admin server, served over HTTP with `--metrics_port`.

Read from the admin at scrape time (a standby admin reports `sax_admin_is_leader 0` and nothing
about the cell):
- `sax_admin_is_leader`: 1 while this admin leads its cell.
- `sax_admin_models`: published models.
- `sax_admin_replicas_wanted{model}` / `sax_admin_replicas_ready{model}`: replicas asked for and
  LOADED (the addresses clients get).
- `sax_admin_servers_joined`: model servers joined and not dropped.
- `sax_admin_placement_changes_total`: placement passes that loaded or unloaded a replica, in
  this admin's current term as leader.
- `sax_admin_state_save_failures_total`: failed attempts to save the published state, in the
  current term.

Every admin has its own `CollectorRegistry`, so several admins can run in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sax.metrics_endpoint import MetricsEndpoint


class _AdminCollector(Collector):
    """Reads the admin's `state` and `manager` (None on a standby) when scraped."""

    def __init__(self, admin: Any) -> None:
        self._admin = admin

    def collect(self) -> Iterator[Any]:
        state = getattr(self._admin, "state", None)
        manager = getattr(self._admin, "manager", None)
        leading = manager is not None and not getattr(manager, "deposed", False)
        yield GaugeMetricFamily(
            "sax_admin_is_leader", "1 while this admin leads its cell.", value=int(leading)
        )
        if state is None or manager is None:
            return
        models = state.models()
        yield GaugeMetricFamily("sax_admin_models", "Published models.", value=len(models))
        wanted = GaugeMetricFamily(
            "sax_admin_replicas_wanted", "Replicas asked for, by model.", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "sax_admin_replicas_ready", "LOADED replicas clients are sent to.", labels=["model"]
        )
        for model_id, model in sorted(models.items()):
            wanted.add_metric([model_id], model.requested_num_replicas)
            ready.add_metric([model_id], len(manager.ready_addresses(model_id)))
        yield wanted
        yield ready
        yield GaugeMetricFamily(
            "sax_admin_servers_joined", "Model servers joined.", value=manager.num_servers()
        )
        yield CounterMetricFamily(
            "sax_admin_placement_changes",
            "Placement passes that loaded or unloaded a replica (this term).",
            value=manager.placement_changes,
        )
        yield CounterMetricFamily(
            "sax_admin_state_save_failures",
            "Failed attempts to save the published state (this term).",
            value=state.save_failures,
        )


class AdminMetrics(MetricsEndpoint):
    """The collectors of one admin server, in their own registry."""

    def __init__(self, admin: Any) -> None:
        """`admin`: an `AdminServer` (its `state` and `manager` are read at scrape time)."""
        super().__init__()
        self.registry.register(_AdminCollector(admin))
