"""`python -m gateway`: the HTTP gateway of a cell (SAX-HTTP and OpenAI-compatible endpoints).

Examples:
  python -m gateway --port=8888                              # the tutorial's port
  python -m gateway --sax_root=gs://bucket/sax-root --sax_cell=/sax/test --timeout=600
  curl -s localhost:8888/generate -d '{"model": "/sax/test/smollm2", "query": "Hi"}'

It logs "gateway listening on http://HOST:PORT" once it accepts connections (--port=0 picks a
free port) and stops on SIGTERM or SIGINT after the requests in flight.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence

from gateway.config import DEFAULT_PORT, GatewaySettings
from sax.cli.common import from_flags
from sax.errors import SaxError
from sax.logs import add_log_level_flag, configure_logging
from sax.storage import resolve_sax_root

logger = logging.getLogger("gateway")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    defaults = GatewaySettings()
    p = _Parser(
        prog="python -m gateway",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port; 0 picks a free one")
    p.add_argument("--host", default=defaults.host, help="address to bind (default: every one)")
    p.add_argument("--sax_root", default="", help="sax_root (folder or gs://..); default $SAX_ROOT")
    p.add_argument(
        "--sax_cell",
        default=defaults.sax_cell,
        help="cell of /v1/models, /health and of model names without a cell",
    )
    p.add_argument(
        "--timeout", type=float, default=defaults.timeout, help="seconds per Generate call"
    )
    p.add_argument(
        "--admin_timeout", type=float, default=defaults.admin_timeout, help="seconds per admin call"
    )
    p.add_argument(
        "--max_concurrent_calls",
        type=int,
        default=defaults.max_concurrent_calls,
        help="Generate calls in flight at once; more are answered 429",
    )
    add_log_level_flag(p)
    return p


def parse_settings(argv: Sequence[str] | None = None) -> tuple[GatewaySettings, str]:
    """Parses and checks the flags; exits 2 with one line on a bad one. Returns the settings and
    the log level."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = args.log_level
    try:
        settings = from_flags(GatewaySettings, args)
    except SaxError as e:
        parser.error(str(e))
    return settings, level


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the gateway until SIGTERM or SIGINT."""
    settings, level = parse_settings(argv)
    configure_logging(level)
    import uvicorn

    from gateway.app import create_app

    try:
        resolve_sax_root(settings.sax_root or None)
        app = create_app(settings)
        sock = _bind(settings.host, settings.port)
    except (SaxError, OSError) as e:
        logger.error("cannot start the gateway: %s", e)
        return 1
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again: exit 0 on it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=level.lower(), access_log=level == "DEBUG")
    server = uvicorn.Server(config)
    logger.info("gateway listening on http://%s:%d", settings.host, port)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
