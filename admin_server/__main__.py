"""`python -m admin_server --sax_cell=/sax/test --port=10000`: runs a cell's admin server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from admin_server.config import AdminConfig
from admin_server.metrics import AdminMetrics
from admin_server.server import AdminServer
from sax.cli.common import from_flags
from sax.errors import SaxError
from sax.logs import add_log_level_flag, configure_logging

logger = logging.getLogger("admin_server")


def _parser() -> argparse.ArgumentParser:
    d = AdminConfig(sax_cell="", sax_root="")
    p = argparse.ArgumentParser(
        prog="python -m admin_server",
        description="Admin server of a Sax cell: keeps published models, places replicas on the "
        "model servers that join, and tells clients where models are served. Several admins may "
        "run for one cell: the one holding the cell's lease leads, the others wait as standbys "
        "and take over when it dies.",
        epilog="example: SAX_ROOT=/tmp/sax-root python -m admin_server --sax_cell=/sax/test "
        "--port=10000",
    )
    p.add_argument("--sax_cell", required=True, help="the cell, e.g. /sax/test")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0: any free port)")
    p.add_argument("--host", default=d.host, help="address to bind")
    p.add_argument(
        "--advertise_host",
        default=d.advertise_host,
        help="host written in the location record (default: --host, or 127.0.0.1 for 0.0.0.0)",
    )
    p.add_argument(
        "--sax_root",
        default=os.environ.get("SAX_ROOT", ""),
        help="local folder or gs://bucket/prefix (default: $SAX_ROOT)",
    )
    p.add_argument(
        "--poll_period_s",
        type=float,
        default=d.poll_period_s,
        help="seconds between status polls of each model server",
    )
    p.add_argument(
        "--poll_timeout_s",
        type=float,
        default=d.poll_timeout_s,
        help="seconds a status poll may take",
    )
    p.add_argument(
        "--dead_after_s",
        type=float,
        default=d.dead_after_s,
        help="drop a server that has not answered a poll for this long",
    )
    p.add_argument(
        "--adopt_grace_s",
        type=float,
        default=d.adopt_grace_s,
        help="after start, seconds to wait for servers to rejoin before placing",
    )
    p.add_argument(
        "--max_load_failures",
        type=int,
        default=d.max_load_failures,
        help="failed loads of a model before it is not tried on more servers",
    )
    p.add_argument(
        "--lease_s",
        type=float,
        default=d.lease_s,
        help="seconds the leader lease holds after each renewal",
    )
    p.add_argument(
        "--lease_renew_s",
        type=float,
        default=d.lease_renew_s,
        help="seconds between two lease renewals by the leader",
    )
    p.add_argument(
        "--standby_poll_s",
        type=float,
        default=d.standby_poll_s,
        help="seconds between two looks at the lease by a standby admin",
    )
    p.add_argument(
        "--clock_skew_s",
        type=float,
        default=d.clock_skew_s,
        help="largest clock difference assumed between admins (lease_s must exceed twice it)",
    )
    p.add_argument("--metrics_port", type=int, default=0, help="Prometheus /metrics port; 0: off")
    add_log_level_flag(p)
    return p


async def _serve(config: AdminConfig) -> None:
    server = AdminServer(config)
    metrics = AdminMetrics(server)
    if config.metrics_port:
        metrics.serve(config.host, config.metrics_port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait())
    await asyncio.wait(
        [waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    await server.stop()
    await asyncio.to_thread(metrics.close)  # joins the HTTP thread
    if waiter.done():
        waiter.result()  # raises what made the admin give up (e.g. a corrupt state)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    if not args.sax_root:
        print("admin_server: no sax_root: pass --sax_root=PATH or set SAX_ROOT", file=sys.stderr)
        return 2
    config = from_flags(AdminConfig, args)
    try:
        asyncio.run(_serve(config))
    except SaxError as e:
        print(f"admin_server: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
