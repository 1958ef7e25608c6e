"""`python -m sax.health_probe TARGET`: exits 0 when a server is healthy, 1 otherwise.

TARGET is a gRPC address ("127.0.0.1:10001"), asked with the standard `grpc.health.v1` service
(healthy: SERVING), or an http(s) URL ("http://127.0.0.1:8888/health"), fetched with GET
(healthy: status 200). Container images use it as their HEALTHCHECK:

  python -m sax.health_probe 127.0.0.1:10000
  python -m sax.health_probe --service=sax.Modelet 127.0.0.1:10001
  python -m sax.health_probe http://127.0.0.1:8888/health
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Asks TARGET once; returns (healthy, a one-line reason)."""
    if target.startswith(("http://", "https://")):
        return _check_http(target, timeout)
    return _check_grpc(target, service, timeout)


def _check_grpc(address: str, service: str, timeout: float) -> tuple[bool, str]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{address}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def _check_http(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {e}"


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m sax.health_probe`."""
    p = argparse.ArgumentParser(
        prog="python -m sax.health_probe",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="host:port (gRPC health) or http(s)://host:port/path")
    p.add_argument("--service", default="", help="gRPC health service name ('': the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 when healthy, 1 when not (one line on stdout either way)."""
    args = parser().parse_args(argv)
    healthy, reason = check(args.target, args.service, args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
