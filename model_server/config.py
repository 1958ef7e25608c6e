"""Model server settings (from the command line, or built directly to embed a server)."""

from __future__ import annotations

from dataclasses import dataclass

from servables import platform

_ANY_HOSTS = ("0.0.0.0", "::", "[::]", "")


@dataclass(frozen=True)
class ModelServerConfig:
    """Everything one model server process needs."""

    # Address to bind, e.g. "0.0.0.0" (all interfaces) or "127.0.0.1".
    host: str = "0.0.0.0"
    # gRPC port of the Modelet, LM and health services; 0 picks a free one.
    port: int = 10001
    # Host the admin and clients reach this server at; empty: `host`, or 127.0.0.1 when `host`
    # binds every interface (set it to the machine's address when clients run elsewhere).
    advertise_host: str = ""
    # Chip kind, e.g. "cpu", "h100", "tpuv5e".
    chip: str = "cpu"
    # Chip topology, e.g. "1", "4", "2x2".
    topology: str = "1"
    # Memory offered to models in bytes; 0: the platform's default.
    memory_bytes: int = 0
    # Free-form tags sent when joining, e.g. ("zone-a",).
    tags: tuple[str, ...] = ()
    # The cell to join, "/sax/<cell>"; empty: serve without joining an admin.
    sax_cell: str = ""
    # sax_root holding the cell (local folder or gs://bucket/prefix); empty: $SAX_ROOT.
    sax_root: str = ""
    # Seconds between two Join calls to the cell's admin.
    join_period_s: float = 2.0
    # Seconds one Join call may take.
    join_timeout_s: float = 10.0
    # Seconds in-flight requests get to finish when the server stops.
    shutdown_grace_s: float = 10.0
    # Threads running the models' compute.
    compute_threads: int = 16
    # Engine of Llama configs: "torch", "jax", or "" for the chip's default (jax on TPUs).
    backend: str = ""
    # JAX's persistent compilation cache folder; empty: none.
    jax_cache_dir: str = ""
    # Multi-process JAX (model_server.backends.jax.multihost): the coordinator "host:port" ("" for
    # one process), the number of processes, this process's id and process 0's control port
    # (0: the coordinator's port + 1).
    jax_coordinator: str = ""
    jax_num_processes: int = 1
    jax_process_id: int = 0
    jax_control_port: int = 0
    # Port of the Prometheus /metrics HTTP endpoint (bound on `host`); 0: no endpoint.
    metrics_port: int = 0
    # With requests running, seconds without a finished engine step (no token out) after which
    # the server reports NOT_SERVING with the reason in GetStatus; 0: never.
    stall_timeout_s: float = 30.0

    def resolved_backend(self) -> str:
        """`backend`, or the chip's default: "jax" on TPU chips, "torch" elsewhere."""
        if self.backend:
            return self.backend
        return "jax" if self.chip in platform.TPU_CHIPS else "torch"

    def advertised_host(self) -> str:
        """The host part of the address sent to the admin."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in _ANY_HOSTS else self.host

    def bind_address(self, port: int | None = None) -> str:
        """ "host:port" to bind (IPv6 hosts in brackets)."""
        return host_port(self.host or "0.0.0.0", self.port if port is None else port)

    def offered_memory_bytes(self) -> int:
        """Memory offered to models: the flag, else the platform's default."""
        return self.memory_bytes or platform.default_memory_bytes(self.chip, self.topology)


def host_port(host: str, port: int) -> str:
    """Formats an address, bracketing IPv6 hosts: ("::1", 80) -> "[::1]:80"."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
