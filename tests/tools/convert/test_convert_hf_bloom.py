"""BLOOM Hugging Face folders -> checkpoint -> the served model: transformers writes a random
BLOOM (safetensors or sharded .bin, or with the original releases' unprefixed names), the
converter writes the checkpoint, the loader serves it; greedy tokens and lm.score agree with
transformers, and Firefly's chat format is the tokenizer's template."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch

from model_server.loader import build_servable
from sax.errors import InvalidArgumentError
from sax.v1 import common_pb2
from servables.configs.bloom import BloomConfig
from servables.sampling_params import SamplingParams
from tests.tools.convert.builders import BLOOM, save_bloom_tokenizer, save_hf, tiny_bloom
from tools import convert

pytest.importorskip("transformers")

CONFIG = BloomConfig(
    num_layers=BLOOM["n_layer"],
    num_heads=BLOOM["n_head"],
    model_dim=BLOOM["hidden_size"],
    vocab_size=BLOOM["vocab_size"],
    batch_sizes=(1, 2),
    input_seq_len=64,
    max_decode_steps=12,
)
LAYOUTS = [("safetensors", ""), ("bin", "200KB"), ("unprefixed", "")]


def _unprefixed(folder: pathlib.Path, model: Any) -> None:
    """The layout of bigscience's releases: BloomModel's names (no `transformer.`), no lm_head."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    state = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_bloom()


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"{f}-{s or 'single'}" for f, s in LAYOUTS])
def checkpoint(
    request: pytest.FixtureRequest, model: Any, tmp_path_factory: pytest.TempPathFactory
) -> str:
    fmt, shard = request.param
    folder = tmp_path_factory.mktemp("hf") / "bloom"
    if fmt == "unprefixed":
        _unprefixed(folder, model)
    else:
        save_hf(model, folder, fmt=fmt, shard=shard)
    save_bloom_tokenizer(folder)
    return convert.convert("hf", str(folder), str(tmp_path_factory.mktemp("ckpt")))


def _greedy(model: Any, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def _log_likelihood(model: Any, prefix: list[int], suffix: list[int]) -> float:
    ids = torch.tensor([prefix + suffix])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(suffix))


def test_served_bloom_generates_and_scores_as_transformers(checkpoint: str, model: Any) -> None:
    servable = build_servable(CONFIG, checkpoint, "cpu", "torch")
    try:
        tok = servable.tokenizer
        extra = common_pb2.ExtraInputs(
            items={"per_example_max_decode_steps": 12.0, "ignore_eos": 1.0}
        )
        params = SamplingParams.from_extra_inputs(extra, CONFIG)
        for prompt in ("hello world", "你好 世界 the quick"):
            ids = tok.encode(prompt)
            expected = _greedy(model, ids, 12)
            (got,) = servable.generate(prompt, params)
            assert got.num_tokens == 12
            assert got.text == tok.decode(expected)
        prefix, suffixes = "the quick", [" brown fox", " world"]
        scores = servable.score(prefix, suffixes, SamplingParams.from_extra_inputs(None, CONFIG))
        head = tok.encode(prefix)
        want = [_log_likelihood(model, head, tok.encode(s, add_bos=False)) for s in suffixes]
        assert scores == pytest.approx(want, abs=1e-3)
    finally:
        servable.close()


def test_the_checkpoint_keeps_bloom_s_config_and_firefly_s_template(checkpoint: str) -> None:
    ckpt = pathlib.Path(checkpoint)
    config = json.loads((ckpt / "metadata" / "config.json").read_text())
    assert config["model_type"] == "bloom" and config["n_layer"] == BLOOM["n_layer"]
    from model_server.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt / "tokenizer")
    chat = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "world"},
    ]
    text = tok.apply_chat_template(chat)
    assert text == "<s>你好</s></s>hello</s><s>world</s></s>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-2:] == [2, 2] and ids.count(1) == 2  # the special tokens' ids


def test_refusals(model: Any, tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "bloom"
    save_hf(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(InvalidArgumentError, match=r"model_type 'gpt2'.*supported: llama, bloom"):
        convert.read_model("hf", str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "n_head": 8}))
    convert.read_model("hf", str(folder))  # the same tensor shapes: the heads are a config fact
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(InvalidArgumentError, match=r"word_embeddings\.weight has shape"):
        convert.read_model("hf", str(folder))
