"""SmolLM2 through the LM gRPC service on the JAX backend (mesh 1x1x8 over eight host devices),
next to the torch backend on the same checkpoint: the same requests, extra inputs included, give
the same answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from model_server.server import ModelServer, servable_model_paths
from sax.v1 import common_pb2, lm_pb2, lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc

pytestmark = pytest.mark.slow

KEY = "/sax/test/smollm2"
OVERRIDES = {
    "INPUT_SEQ_LEN": "32",
    "BUCKET_KEYS": "[32]",
    "BATCH_SIZE": "[1, 4]",
    "MAX_DECODE_STEPS": "16",
}
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a")


def extra(**items: float | str) -> common_pb2.ExtraInputs:
    numbers = {k: float(v) for k, v in items.items() if not isinstance(v, str)}
    strings = {k: v for k, v in items.items() if isinstance(v, str)}
    return common_pb2.ExtraInputs(items=numbers, strings=strings)


def generate(stub: lm_pb2_grpc.LMServiceStub, text: str, **items: float | str):
    request = lm_pb2.GenerateRequest(model_key=KEY, text=text, extra_inputs=extra(**items))
    return [(t.text, t.score) for t in stub.Generate(request, timeout=60).texts]


def stream(stub: lm_pb2_grpc.LMServiceStub, text: str, **items: float | str) -> str:
    request = lm_pb2.GenerateRequest(model_key=KEY, text=text, extra_inputs=extra(**items))
    out = ""
    for response in stub.GenerateStream(request, timeout=60):
        item = response.items[0]
        out = out[: item.prefix_len] + item.text
    return out


def score(stub: lm_pb2_grpc.LMServiceStub, prefix: str, suffixes: list[str]) -> list[float]:
    request = lm_pb2.ScoreRequest(model_key=KEY, prefix=prefix, suffix=suffixes)
    return list(stub.Score(request, timeout=60).logp)


def _serve(server: ModelServer, checkpoint: str, overrides: dict[str, str]) -> Iterator:
    channel = grpc.insecure_channel(server.address)
    modelet_pb2_grpc.ModeletStub(channel).Load(
        modelet_pb2.LoadRequest(
            model_key=KEY,
            model_path="llama.SmolLM2_135M",
            checkpoint_path=checkpoint,
            overrides=overrides,
        ),
        timeout=300,
    )
    yield lm_pb2_grpc.LMServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def jax_lm(start_server: Callable[..., ModelServer], smollm2_checkpoint: str):
    server = start_server(backend="jax", topology="8")
    yield from _serve(server, smollm2_checkpoint, {**OVERRIDES, "ICI_MESH_SHAPE": "[1, 1, 8]"})


@pytest.fixture(scope="module")
def torch_lm(start_server: Callable[..., ModelServer], smollm2_checkpoint: str):
    yield from _serve(start_server(backend="torch"), smollm2_checkpoint, OVERRIDES)


def test_jax_server_advertises_llama_configs_for_any_mesh() -> None:
    jax_paths = servable_model_paths("cpu", "8", "jax")
    assert "llama.SmolLM2_135M" in jax_paths
    assert "llama.SmolLM2_135M" not in servable_model_paths("cpu", "8", "torch")
    assert "llama.LLaMA70BFP16TPUv5e" in servable_model_paths("tpuv5e", "16", "jax")
    assert "llama.SmolLM2_135M" not in servable_model_paths("tpuv5e", "8", "jax")
    # BLOOM runs on torch only: a JAX server does not offer it, a torch CPU server does.
    assert not [p for p in servable_model_paths("cpu", "1", "jax") if p.startswith("bloom.")]
    assert "bloom.Bloom560M" in servable_model_paths("cpu", "1", "torch")


def test_generate_matches_torch(jax_lm, torch_lm) -> None:
    for prompt in PROMPTS:
        got, want = generate(jax_lm, prompt), generate(torch_lm, prompt)
        assert [t for t, _ in got] == [t for t, _ in want], prompt
        assert got[0][0] and got[0][1] == pytest.approx(want[0][1], abs=1e-3)
    for items in (
        dict(per_example_max_decode_steps=4),
        dict(stop="."),
        dict(temperature=0.8, top_k=20, top_p=0.9, seed=3),
        dict(temperature=0.7, repetition_penalty=1.3, seed=11),
    ):
        got, want = generate(jax_lm, PROMPTS[2], **items), generate(torch_lm, PROMPTS[2], **items)
        assert [t for t, _ in got] == [t for t, _ in want], items
    capped = generate(jax_lm, PROMPTS[2], per_example_max_decode_steps=4)[0][0]
    assert capped and generate(jax_lm, PROMPTS[2])[0][0].startswith(capped)
    assert "." not in generate(jax_lm, PROMPTS[2], stop=".")[0][0]


def test_stream_reassembles_to_generate(jax_lm) -> None:
    for prompt in PROMPTS[:2]:
        assert stream(jax_lm, prompt) == generate(jax_lm, prompt)[0][0]
    sampled = dict(temperature=0.8, top_k=20, seed=5)
    assert stream(jax_lm, PROMPTS[1], **sampled) == generate(jax_lm, PROMPTS[1], **sampled)[0][0]


def test_score_matches_torch(jax_lm, torch_lm) -> None:
    prefix, suffixes = "The capital of France is", [" Paris", " London", ""]
    got, want = score(jax_lm, prefix, suffixes), score(torch_lm, prefix, suffixes)
    assert got == pytest.approx(want, abs=1e-3)
    assert got[0] > got[1] and got[2] == 0.0


def test_bad_extra_input_is_invalid_argument(jax_lm) -> None:
    with pytest.raises(grpc.RpcError) as e:
        generate(jax_lm, PROMPTS[0], temperature=-1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
