"""Admin server settings (from the command line)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdminConfig:
    """Everything the admin server needs to run one cell."""

    # The cell, "/sax/<cell>".
    sax_cell: str
    # sax_root: a local folder or gs://bucket/prefix.
    sax_root: str
    # gRPC port; 0 picks a free one.
    port: int = 10000
    # Address to bind.
    host: str = "0.0.0.0"
    # Host written into the location record; empty: `host`, or 127.0.0.1 when host is 0.0.0.0.
    advertise_host: str = ""
    # Seconds between two status polls of every joined model server.
    poll_period_s: float = 2.0
    # Seconds a status poll may take.
    poll_timeout_s: float = 2.0
    # A server with no successful poll for this long is dropped and its replicas re-placed.
    dead_after_s: float = 10.0
    # After start, seconds during which no new replica is placed, so that servers rejoin and
    # their loaded models are adopted rather than placed again.
    adopt_grace_s: float = 5.0
    # Failed loads of one model before the admin stops trying other servers.
    max_load_failures: int = 3
    # Seconds a Load RPC may take (reading a large checkpoint takes minutes).
    load_timeout_s: float = 1800.0
    # Port of the Prometheus /metrics HTTP endpoint (bound on `host`); 0: no endpoint.
    metrics_port: int = 0
    # Leader lease (admin high availability): seconds a lease holds after each renewal. A
    # standby takes over at most lease_s + clock_skew_s + standby_poll_s after the leader's
    # last renewal.
    lease_s: float = 5.0
    # Seconds between two renewals by the leader (about lease_s / 3).
    lease_renew_s: float = 1.5
    # Seconds between two looks at the lease by a standby.
    standby_poll_s: float = 1.0
    # Largest wall-clock difference assumed between two admins of the cell; lease_s must be
    # more than twice this.
    clock_skew_s: float = 1.0

    @property
    def address(self) -> str:
        """The address written into the location record."""
        host = self.advertise_host or (
            "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        )
        return f"{host}:{self.port}"
