"""A BLOOM through a whole cell: a random BLOOM written by transformers, converted with
`saxutil convert --from hf`, published as bloom.Bloom560M with its shape overridden, answered
by `saxutil lm.generate` and by the gateway's chat route in Firefly's format."""

from __future__ import annotations

import httpx
import pytest

import sax
from gateway.config import GatewaySettings
from tests.gateway.servers import serve
from tests.integration.cluster import Cluster, wait_for
from tests.tools.convert.builders import BLOOM, save_bloom_tokenizer, save_hf, tiny_bloom

pytest.importorskip("transformers")

MODEL = "/sax/test/bloom"
SHAPE = (
    f"NUM_LAYERS={BLOOM['n_layer']}",
    f"NUM_HEADS={BLOOM['n_head']}",
    f"MODEL_DIMS={BLOOM['hidden_size']}",
    f"VOCAB_SIZE={BLOOM['vocab_size']}",
)


def test_bloom_converts_publishes_and_chats_in_firefly_s_format(
    local_cluster: Cluster, tmp_path
) -> None:
    c = local_cluster
    src, dst = tmp_path / "hf-bloom", tmp_path / "ckpt"
    save_hf(tiny_bloom(), src)
    save_bloom_tokenizer(src)
    r = c.saxutil("convert", "--from", "hf", str(src), str(dst), timeout=120)
    assert r.returncode == 0, r.stderr
    checkpoint = str(dst / "checkpoint_00000000")
    c.start_admin()
    c.start_model_server()
    r = c.saxutil("publish", MODEL, "bloom.Bloom560M", checkpoint, "1", *SHAPE)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 1, 120, "the BLOOM to load", interval=0.2)
    r = c.saxutil("lm.generate", "-extra=per_example_max_decode_steps:6", MODEL, "hello world")
    assert r.returncode == 0, r.stderr + c.logs()
    assert r.stdout.strip(), r.stdout

    gateway = serve(GatewaySettings(sax_root=c.root, admin_timeout=5.0, timeout=60.0))
    try:
        ask = {"model": "bloom", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        chat = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={**ask, "messages": [{"role": "user", "content": "hello world"}]},
            timeout=60,
        )
        assert chat.status_code == 200, chat.text
        plain = httpx.post(
            f"{gateway.url}/v1/completions",
            json={**ask, "prompt": "<s>hello world</s></s>"},
            timeout=60,
        )
        assert plain.status_code == 200, plain.text
        chat_body, plain_body = chat.json(), plain.json()
        assert chat_body["choices"][0]["message"]["content"] == plain_body["choices"][0]["text"]
        assert chat_body["usage"] == plain_body["usage"]
        assert chat_body["usage"]["completion_tokens"] == 6
    finally:
        gateway.close()
        sax.SetSaxRoot(None)
