"""What the routes share: the settings, the call runner, the model catalog and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.calls import CallRunner
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics


@dataclass(frozen=True)
class GatewayState:
    """Kept in `app.state.gateway`."""

    settings: GatewaySettings
    runner: CallRunner
    catalog: ModelCatalog
    metrics: GatewayMetrics

    @classmethod
    def build(cls, settings: GatewaySettings) -> GatewayState:
        """Creates the pools, the catalog and the metrics registry for `settings`."""
        runner = CallRunner(settings.max_concurrent_calls, settings.timeout)
        return cls(
            settings=settings,
            runner=runner,
            catalog=ModelCatalog(
                settings.sax_cell, settings.admin_timeout, settings.model_cache_ttl_s
            ),
            metrics=GatewayMetrics(lambda: runner.in_flight),
        )
