"""`python -m model_server`: run a model server, optionally joined to a cell.

Examples:
  python -m model_server --port=0                        # serve only (load with the Modelet API)
  python -m model_server --sax_cell=/sax/test --sax_root=/tmp/sax-root
  python -m model_server --sax_cell=/sax/test --platform_chip=h100 --platform_topology=1 \\
      --host=0.0.0.0 --advertise_host=10.0.0.5 --tags=zone-a

The server binds --host (default 0.0.0.0, every interface) and tells the admin and clients to
reach it at --advertise_host; by default that is 127.0.0.1 when --host binds every interface and
--host itself otherwise, so set --advertise_host to the machine's address when clients run on
other machines. It stops on SIGTERM or SIGINT: health NOT_SERVING, the admin is told at once, new
LM calls get UNAVAILABLE (clients retry another replica), in-flight calls get --shutdown_grace_s
seconds to finish, then the process exits with status 0. --metrics_port serves Prometheus metrics
at http://HOST:PORT/metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from model_server.config import ModelServerConfig
from sax.cli.common import from_flags
from sax.errors import InvalidArgumentError, SaxError
from sax.logs import add_log_level_flag, configure_logging
from sax.naming import parse_cell
from sax.storage import resolve_sax_root
from servables import platform

logger = logging.getLogger("model_server")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m model_server",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sax_cell", default="", help="cell to join, /sax/<cell>; empty: do not join")
    p.add_argument("--sax_root", default="", help="sax_root (folder or gs://..); default $SAX_ROOT")
    p.add_argument("--port", type=int, default=10001, help="gRPC port; 0 picks a free one")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: every interface)")
    p.add_argument(
        "--advertise_host",
        default="",
        help="host sent to the admin; default 127.0.0.1 if --host is 0.0.0.0, else --host",
    )
    p.add_argument("--platform_chip", default="cpu", help="chip kind, e.g. cpu, h100, tpuv5e")
    p.add_argument("--platform_topology", default="1", help="chip topology, e.g. 1, 4, 2x2")
    p.add_argument(
        "--memory_bytes", type=int, default=0, help="memory offered to models; default: per chip"
    )
    p.add_argument("--tags", default="", help="comma-separated tags sent to the admin")
    p.add_argument(
        "--join_period_s",
        type=float,
        default=ModelServerConfig.join_period_s,
        help="seconds between Joins (how fast a new or restarted admin is found)",
    )
    p.add_argument(
        "--shutdown_grace_s", type=float, default=10.0, help="seconds in-flight calls get at stop"
    )
    p.add_argument(
        "--metrics_port", type=int, default=0, help="Prometheus /metrics HTTP port; 0: off"
    )
    p.add_argument(
        "--stall_timeout_s",
        type=float,
        default=ModelServerConfig.stall_timeout_s,
        help="NOT_SERVING when requests run but no token comes out for this long; 0: never",
    )
    add_log_level_flag(p)
    # JAX backend and multi-process serving (docs/jax.md).
    p.add_argument(
        "--backend", default="", help="engine of Llama configs: torch or jax; default jax on TPUs"
    )
    p.add_argument("--jax_cache_dir", default="", help="JAX persistent compilation cache folder")
    p.add_argument(
        "--jax_coordinator", default="", help="host:port of process 0 for multi-process JAX"
    )
    p.add_argument("--jax_num_processes", type=int, default=1, help="processes of one server")
    p.add_argument("--jax_process_id", type=int, default=0, help="this process, 0 serves gRPC")
    p.add_argument(
        "--jax_control_port",
        type=int,
        default=0,
        help="process 0's control port for the others; default the coordinator's port + 1",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> tuple[ModelServerConfig, str]:
    """Parses and checks the flags; exits 2 with one line on a bad one. Returns the config and
    the log level."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = args.log_level
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.join_period_s <= 0 or args.shutdown_grace_s < 0 or args.memory_bytes < 0:
        parser.error("--join_period_s must be > 0; --shutdown_grace_s, --memory_bytes >= 0")
    if not 0 <= args.metrics_port < 65536 or args.stall_timeout_s < 0:
        parser.error("--metrics_port must be in [0, 65535] and --stall_timeout_s >= 0")
    if args.backend not in ("", "torch", "jax"):
        parser.error(f"--backend must be torch or jax, got {args.backend!r}")
    try:
        if args.jax_coordinator or args.jax_num_processes != 1:
            from model_server.backends.jax.multihost import MultihostConfig

            MultihostConfig(
                args.jax_coordinator,
                args.jax_num_processes,
                args.jax_process_id,
                args.jax_control_port,
            ).validate()
        chip = platform.parse_chip(args.platform_chip)
        platform.num_devices(args.platform_topology)
        sax_root = args.sax_root
        if args.sax_cell:
            parse_cell(args.sax_cell)
            sax_root = resolve_sax_root(args.sax_root or None)
    except SaxError as e:
        parser.error(str(e))
    config = from_flags(
        ModelServerConfig,
        args,
        chip=chip,
        topology=args.platform_topology,
        tags=tuple(t.strip() for t in args.tags.split(",") if t.strip()),
        sax_root=sax_root,
    )
    return config, level


async def serve(config: ModelServerConfig) -> None:
    """Runs a server until SIGTERM or SIGINT, then stops it gracefully."""
    from model_server.server import ModelServer

    server = ModelServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping: in-flight calls get %gs", config.shutdown_grace_s)
    await server.stop(config.shutdown_grace_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    config, level = parse_config(argv)
    configure_logging(level)
    try:
        if config.jax_coordinator and config.resolved_backend() != "jax":
            raise InvalidArgumentError("--jax_coordinator needs --backend=jax")
        if config.resolved_backend() == "jax":
            from model_server.backends.jax import multihost

            group = None
            if config.jax_coordinator:
                group = multihost.MultihostConfig(
                    config.jax_coordinator,
                    config.jax_num_processes,
                    config.jax_process_id,
                    config.jax_control_port,
                )
            multihost.initialize(config.chip, config.topology, group, config.jax_cache_dir)
            if group is not None and group.process_id != 0:
                from model_server.backends.jax.jax_runner import build_jax_runner

                # Until process 0 stops or goes away.
                return multihost.follow(group, build_jax_runner)
            if group is not None:
                multihost.start_leader(group)
        try:
            asyncio.run(serve(config))
        finally:
            if config.jax_coordinator:
                from model_server.backends.jax import multihost

                multihost.stop_leader()
    except SaxError as e:
        print(f"model_server: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
