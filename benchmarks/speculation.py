"""Speculative decoding by prompt lookup: our engine in-process on SmolLM2-135M (float32), each
workload with `speculative_tokens` 0 and the values asked for, side by side in one run.

Workloads: `quote` (chat prompts asking to repeat a paragraph of this project's docs word for
word: output that repeats the prompt), `chat` (benchmarks/prompts/chat.jsonl) and `random`
(random words, exactly 128 output tokens: drafts rarely match, so this is what checking them
costs). Each at concurrency 1 and 16, greedy. Reports output tok/s, TPOT, the draft acceptance
rate (the engine's counters) and whether every text equals the one without speculation; token
counts are the engine's. Writes speculation.json and speculation.txt.

Run:  .venv/bin/python benchmarks/speculation.py --out benchmarks/results/speculation  (~6 min)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.serve import CACHE, MODEL, converted_checkpoint, gguf_path
from benchmarks.serving import loadgen, machine, systems, workload
from benchmarks.serving.request_stats import aggregate

logger = logging.getLogger("speculation")

OVERRIDES = {
    "INPUT_SEQ_LEN": "512",
    "BUCKET_KEYS": "[128, 512]",
    "MAX_DECODE_STEPS": "128",
    "BATCH_SIZE": "[1, 2, 4, 8, 16]",
    "MAX_QUEUE": "64",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/speculation")
    parser.add_argument("--tokens", default="4,8", help="speculative_tokens values besides 0")
    parser.add_argument("--requests", default="4,16", help="requests at concurrency 1 and 16")
    parser.add_argument("--workloads", default="quote,chat,random")
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from model_server.engine.tokenizer import Tokenizer
    from model_server.loader import build_servable
    from servables import registry
    from servables.servable_config import apply_overrides

    started = time.perf_counter()
    checkpoint, _ = converted_checkpoint(gguf_path(), CACHE)
    tok = Tokenizer.from_dir(checkpoint / "checkpoint_00000000" / "tokenizer")
    n1, n16 = (int(x) for x in args.requests.split(","))
    n = max(n1, n16)
    sets = {
        "quote": workload.quote_prompts(tok, n, args.output_len),
        "chat": workload.chat_prompts(tok, n, args.output_len),
        "random": workload.random_prompts(tok, n, 128, args.output_len),
    }
    config = apply_overrides(registry.get(MODEL), OVERRIDES)
    servable = build_servable(config, str(checkpoint))
    ks = [0, *(int(k) for k in args.tokens.split(","))]
    runs: list[dict[str, Any]] = []

    def count(text: str) -> int:
        return len(tok.encode(text, add_bos=False))

    try:
        warm = systems.InProcessSystem(servable, config)
        loadgen.run_request(warm, sets["random"][0], count)
        for name in args.workloads.split(","):
            for c, many in ((1, n1), (16, n16)):
                prompts = sets[name][:many]
                texts: list[str] | None = None
                for k in ks:
                    system = systems.InProcessSystem(
                        servable, config, f"k={k}", {"speculative_tokens": float(k)}
                    )
                    before = servable.stats()
                    results, wall = loadgen.fixed_concurrency(system, prompts, c, count)
                    after = servable.stats()
                    drafted = after.draft_tokens - before.draft_tokens
                    accepted = after.accepted_tokens - before.accepted_tokens
                    got = [r.text for r in results]
                    texts = texts if texts is not None else got
                    summary = aggregate(results, wall)
                    run = {
                        "workload": name,
                        "concurrency": c,
                        "speculative_tokens": k,
                        "summary": summary,
                        "draft_tokens": drafted,
                        "accepted_tokens": accepted,
                        "acceptance": accepted / drafted if drafted else None,
                        "same_texts_as_k0": got == texts,
                    }
                    runs.append(run)
                    logger.info(
                        "%-6s c=%-2d k=%d  %.1f out tok/s  accepted %d/%d  same %s",
                        name,
                        c,
                        k,
                        summary["output_throughput"],
                        accepted,
                        drafted,
                        got == texts,
                    )
    finally:
        servable.close()
    info = machine.cpu_info()
    data = {
        "config": {"model": MODEL, "overrides": OVERRIDES, "argv": sys.argv[1:]},
        "machine": {**info, "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": runs,
        "elapsed_s": time.perf_counter() - started,
    }
    (out / "speculation.json").write_text(json.dumps(data, indent=1, default=str))
    text = table(runs, f"{info['cpu']}, {os.cpu_count()} CPUs, {info['flags']}")
    (out / "speculation.txt").write_text(text + "\n")
    print(text)


def table(runs: Sequence[dict[str, Any]], where: str) -> str:
    """A Markdown table: one row per workload, concurrency and k, with the speed-up over k=0."""
    lines = [
        f"Prompt-lookup speculation, SmolLM2-135M float32 in-process, greedy ({where})",
        "",
        "| workload | conc | k | out tok/s | x k=0 | TPOT p50 | accepted / draft | same text |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base: dict[tuple[str, int], float] = {}
    for r in runs:
        s = r["summary"]
        tps = s["output_throughput"]
        key = (r["workload"], r["concurrency"])
        if r["speculative_tokens"] == 0:
            base[key] = tps
        ratio = tps / base[key] if base.get(key) else float("nan")
        tpot = s["tpot"]["p50"] * 1e3 if s.get("tpot") else float("nan")
        rate = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['speculative_tokens']} | {tps:.1f} | "
            f"{ratio:.2f} | {tpot:.0f} ms | {r['accepted_tokens']}/{r['draft_tokens']} ({rate}) "
            f"| {'yes' if r['same_texts_as_k0'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
