"""The systems compared: our model through the `sax` client (gRPC, admin and model server as
processes), our engine in-process (`EngineServable`, no gRPC), llama.cpp through
llama-cpp-python (one `Llama` object, requests serialized, as its Python server does by
default), and Hugging Face transformers `generate` over static batches."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from benchmarks.serving.loadgen import ChunkCallback, fixed_concurrency, run_request
from benchmarks.serving.request_stats import RequestResult
from benchmarks.serving.workload import Prompt

# Every data call's deadline, seconds (a conc-64 request may queue behind three waves).
TIMEOUT_S = 900.0


def _extra(prompt: Prompt) -> dict[str, float]:
    extra = {"temperature": 0.0, "per_example_max_decode_steps": float(prompt.max_tokens)}
    if prompt.fixed_output:
        extra["ignore_eos"] = 1.0
    return extra


class SaxSystem:
    """A published model called through `sax.Model(id).LM().GenerateStream`."""

    def __init__(self, model_id: str, name: str = "ours (gRPC)") -> None:
        import sax

        self.name = name
        self._lm = sax.Model(model_id).LM()

    def stream(self, prompt: Prompt, on_chunk: ChunkCallback) -> int | None:
        import sax

        options = sax.ModelOptions()
        for key, value in _extra(prompt).items():
            options.SetExtraInput(key, value)
        options.SetTimeout(TIMEOUT_S)

        def callback(last: bool, items: list[tuple[str, int, list[float]]]) -> None:
            if items:
                on_chunk(items[0][0], items[0][1])

        self._lm.GenerateStream(prompt.text, callback, options)
        return None


class InProcessSystem:
    """Our engine in the benchmark's process: `EngineServable.generate_stream`, no gRPC."""

    def __init__(
        self,
        servable: Any,
        config: Any,
        name: str = "ours (in-process)",
        extra: dict[str, float] | None = None,
    ) -> None:
        """extra: extra inputs every request sets besides the prompt's own."""
        self.name = name
        self._servable = servable
        self._config = config
        self._more = dict(extra or {})

    def stream(self, prompt: Prompt, on_chunk: ChunkCallback) -> int | None:
        from sax.v1 import common_pb2
        from servables.sampling_params import SamplingParams

        extra = common_pb2.ExtraInputs(items={**_extra(prompt), **self._more})
        params = SamplingParams.from_extra_inputs(extra, self._config)
        params = params.for_call(time.monotonic() + TIMEOUT_S, threading.Event())
        counted = 0
        for items in self._servable.generate_stream(prompt.text, params):
            on_chunk(items[0].text, items[0].prefix_len)
            counted = items[0].num_tokens or counted
        return counted or None  # the engine's count of the tokens it made


class LlamaCppSystem:
    """llama.cpp on a GGUF file: one `Llama`, one request at a time, streamed.

    Every call runs on one worker thread: each thread that calls into llama.cpp gets its own
    OpenMP thread team, and the idle teams of other callers spin on the same cores (a third of
    the speed when callers take turns)."""

    def __init__(self, gguf: str, threads: int, n_ctx: int = 2048, name: str = "") -> None:
        import llama_cpp.llama as llama_module

        # ggml's extra CPU buffer types (AMX and repacked weights) crash in llama_decode on CPUs
        # that report AMX inside virtual machines; the model is loaded without them.
        default_params = llama_module.llama_cpp.llama_model_default_params

        def without_extra_buffers() -> Any:
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
        try:
            self._llm = llama_module.Llama(
                model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False
            )
        finally:
            llama_module.llama_cpp.llama_model_default_params = default_params
        self._eos = self._llm.token_eos()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp")
        self.name = name or "llama.cpp"

    def stream(self, prompt: Prompt, on_chunk: ChunkCallback) -> int | None:
        # Requests queue for the one worker (serialized, as the Python server does).
        return self._worker.submit(self._generate, prompt, on_chunk).result()

    def _generate(self, prompt: Prompt, on_chunk: ChunkCallback) -> int:
        bias = {self._eos: -1e9} if prompt.fixed_output else None
        tokens = 0
        text = ""
        for chunk in self._llm.create_completion(
            prompt.text,
            max_tokens=prompt.max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            logit_bias=bias,
            stream=True,
        ):
            piece = chunk["choices"][0]["text"]
            tokens += 1
            if piece:
                on_chunk(piece, len(text))
                text += piece
        return tokens


def llamacpp_runs(
    gguf: str, threads: int, runs: Sequence[tuple[str, int, Sequence[Prompt]]]
) -> tuple[float, list[tuple[str, int, list[RequestResult], float]]]:
    """Loads llama.cpp and runs (workload name, concurrency, prompts) in turn; returns the load
    seconds and each run's results and wall time.

    Meant for a fresh process (see `benchmarks/serve.py`): llama.cpp's libgomp has the same
    soname as torch's, so in a process that loaded torch it shares torch's OpenMP runtime and
    its wait policy (passive there), which halves llama.cpp's speed."""
    start = time.perf_counter()
    system = LlamaCppSystem(gguf, threads)
    load_s = time.perf_counter() - start
    warm = dataclasses.replace(runs[0][2][0], max_tokens=4)
    run_request(system, warm, len)
    out = []
    for name, concurrency, prompts in runs:
        results, wall = fixed_concurrency(system, prompts, concurrency, len)  # counts reported
        out.append((name, concurrency, results, wall))
    return load_s, out


class _StepClock:
    """A transformers logits processor that records when each generation step's logits are
    ready (the step's token is chosen right after)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hf_static_batches(
    model: Any, prompts: Sequence[Prompt], batch_size: int
) -> tuple[list[RequestResult], float]:
    """transformers `generate` (greedy) over consecutive static batches of `batch_size` prompts
    (left-padded). A request's latencies count from its batch's start; all requests of a batch
    get their tokens at the same steps. Returns the results and the wall time."""
    from transformers import LogitsProcessorList

    results: list[RequestResult] = []
    start_all = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        width = max(len(p.token_ids) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, width - len(p.token_ids) :] = torch.tensor(p.token_ids)
            mask[i, width - len(p.token_ids) :] = 1
        new = max(p.max_tokens for p in batch)
        clock = _StepClock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
            )
        end = time.perf_counter()
        for p in batch:
            results.append(
                RequestResult(
                    start=start,
                    end=end,
                    chunk_times=list(clock.times),
                    output_tokens=len(clock.times),
                    prompt_tokens=len(p.token_ids),
                )
            )
    return results, time.perf_counter() - start_all
