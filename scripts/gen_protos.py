"""Generates the Python protobuf and gRPC modules from proto/sax/v1 into client/sax/v1.

Usage: python scripts/gen_protos.py [--check]

With --check, generates into a temporary folder and exits 1 if the committed modules differ
(stale generated code). grpcio-tools is pinned in pyproject.toml so the output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "client"
PACKAGE = pathlib.Path("sax") / "v1"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc on every .proto under proto/sax/v1; returns the generated files (relative)."""
    protos = sorted((PROTO_DIR / PACKAGE).glob("*.proto"))
    (out_dir / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(
        p.relative_to(out_dir)
        for p in (out_dir / PACKAGE).iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if not args.check:
        files = generate(OUT_DIR)
        print(f"generated {len(files)} files into {OUT_DIR / PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        committed = sorted(
            p.relative_to(OUT_DIR)
            for p in (OUT_DIR / PACKAGE).iterdir()
            if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
        )
        stale = [
            str(f)
            for f in fresh
            if not (OUT_DIR / f).exists()
            or not filecmp.cmp(pathlib.Path(tmp) / f, OUT_DIR / f, shallow=False)
        ]
        extra = [str(f) for f in committed if f not in fresh]
        if stale or extra:
            print(
                "generated protobuf code is stale; run: python scripts/gen_protos.py",
                file=sys.stderr,
            )
            for f in stale + extra:
                print(f"  {f}", file=sys.stderr)
            return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
