"""`python -m admin_server --sax_cell=/sax/test --port=10000`: runs a cell's admin server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from admin_server.config import AdminConfig
from admin_server.server import AdminServer
from sax.errors import SaxError

logger = logging.getLogger("admin_server")


def _parser() -> argparse.ArgumentParser:
    d = AdminConfig(sax_cell="", sax_root="")
    p = argparse.ArgumentParser(
        prog="python -m admin_server",
        description="Admin server of a Sax cell: keeps published models, places replicas on the "
        "model servers that join, and tells clients where models are served.",
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
    p.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


async def _serve(config: AdminConfig) -> None:
    server = AdminServer(config)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.sax_root:
        print("admin_server: no sax_root: pass --sax_root=PATH or set SAX_ROOT", file=sys.stderr)
        return 2
    config = AdminConfig(
        sax_cell=args.sax_cell,
        sax_root=args.sax_root,
        port=args.port,
        host=args.host,
        advertise_host=args.advertise_host,
        poll_period_s=args.poll_period_s,
        poll_timeout_s=args.poll_timeout_s,
        dead_after_s=args.dead_after_s,
        adopt_grace_s=args.adopt_grace_s,
        max_load_failures=args.max_load_failures,
    )
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
