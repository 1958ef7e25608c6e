"""The gateway in front of a real cell: the openai client, SAX-HTTP, errors, limits, metrics."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

import httpx
import openai
import pytest

import sax
from tests.gateway.servers import DOWN_CELL, SMOLLM2, TINY, GatewayCell
from tests.integration.cluster import REPO, wait_for

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: The tutorial's /generate body (ai-on-gke README), with a chat-formatted query.
TUTORIAL = {
    "model": SMOLLM2,
    "query": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "extra_inputs": {
        "temperature": 0.5,
        "per_example_max_decode_steps": 128,
        "per_example_top_k": 200,
        "per_example_top_p": 0.95,
    },
}


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_and_stream_answer_paris(gateway_cell: GatewayCell) -> None:
    client = _openai(gateway_cell.main.url)
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text, text
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.object == "chat.completion"
    assert answer.usage is not None and answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=SMOLLM2,
            messages=QUESTION,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_completions_limits_seeds_and_streams(gateway_cell: GatewayCell) -> None:
    client = _openai(gateway_cell.main.url)
    prompt = "The capital of France is"
    done = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    choice = done.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length", choice
    assert done.usage is not None and done.usage.completion_tokens == 8

    streamed = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True, echo=True
    )
    assert "".join(c.choices[0].text for c in streamed) == prompt + choice.text

    stop = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stop=["."]
    )
    assert stop.choices[0].text == choice.text.split(".")[0]
    assert stop.choices[0].finish_reason == "stop"

    sampled = client.completions.create(
        model="smollm2",
        prompt=[prompt, "Once upon a time"],
        max_tokens=6,
        n=2,
        seed=7,
        temperature=1.0,
    )
    again = client.completions.create(
        model="smollm2",
        prompt=[prompt, "Once upon a time"],
        max_tokens=6,
        n=2,
        seed=7,
        temperature=1.0,
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]

    tiny = client.completions.create(model=TINY, prompt="Hello", max_tokens=4)
    assert tiny.usage is not None and tiny.usage.completion_tokens == 4
    assert tiny.choices[0].finish_reason == "length"


def test_usage_is_the_engines_count_and_ignore_eos_runs_to_the_limit(
    gateway_cell: GatewayCell,
) -> None:
    client = _openai(gateway_cell.main.url)
    prompt = "The capital of France is Paris. The capital of Italy is"

    def streamed(**extra: object) -> tuple[str, str, Any]:
        chunks = list(
            client.completions.create(
                model="smollm2",
                prompt=prompt,
                max_tokens=48,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        return text, reasons[-1], chunks[-1].usage

    text, reason, usage = streamed()
    # SmolLM2 ends this answer before 48 tokens: its end-of-sequence token counts, as in vLLM.
    assert reason == "stop" and usage.completion_tokens < 48, (text, usage)
    full, reason, long_usage = streamed(ignore_eos=True, top_k=0, repetition_penalty=1.0)
    assert reason == "length" and long_usage.completion_tokens == 48
    assert full.startswith(text) and len(full) > len(text)
    assert long_usage.prompt_tokens == usage.prompt_tokens > 10
    # Prompt lookup changes how many steps it takes, not the greedy text or its count.
    drafted, reason, drafted_usage = streamed(ignore_eos=True, speculative_tokens=4)
    assert (drafted, reason, drafted_usage.completion_tokens) == (full, "length", 48)
    with pytest.raises(openai.BadRequestError, match="min_p"):
        client.completions.create(model="smollm2", prompt=prompt, extra_body={"min_p": 0.1})


def test_chat_without_a_template_uses_the_plain_format(gateway_cell: GatewayCell) -> None:
    client = _openai(gateway_cell.main.url)
    ask = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "n": 2, "seed": 3}
    first = client.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1]
    # TinyLM has no tokenizer files, yet its engine counts the tokens it made.
    assert first.usage is not None and first.usage.completion_tokens == 8
    again = client.chat.completions.create(**ask)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine)  # TinyLM streams its first sample


def test_models_lists_the_published_models(gateway_cell: GatewayCell) -> None:
    client = _openai(gateway_cell.main.url)
    ids = [m.id for m in client.models.list()]
    assert SMOLLM2 in ids and TINY in ids
    assert client.models.retrieve("tiny").id == TINY


def test_generate_with_the_tutorial_json(gateway_cell: GatewayCell) -> None:
    with httpx.Client(base_url=gateway_cell.main.url, timeout=60) as http:
        r = http.post("/generate", json=TUTORIAL)
        assert r.status_code == 200, r.text
        [[text, score]] = r.json()
        assert isinstance(text, str) and isinstance(score, float)
        greedy = {**TUTORIAL, "extra_inputs": {"temperature": 0}}
        [[text, _]] = http.post("/generate", json=greedy).json()
        assert "Paris" in text
        two = http.post("/generate", json={"model": TINY, "query": "Hi"}).json()
        assert len(two) == 2 and all(isinstance(t, str) for t, _ in two)  # TinyLM: 2 samples


def test_publish_list_update_unpublish_round_trip(gateway_cell: GatewayCell) -> None:
    model = "/sax/test/tiny2"
    body = {
        "model": model,
        "model_path": "test.TinyLM",
        "checkpoint": "None",
        "replicas": 1,
        "overrides": "MAX_DECODE_STEPS=8 BATCH_SIZE=[1,2]",
    }
    with httpx.Client(base_url=gateway_cell.main.url, timeout=30) as http:
        r = http.post("/publish", json=body)
        assert r.status_code == 200, r.text
        assert r.json() == {**body, "overrides": {"MAX_DECODE_STEPS": "8", "BATCH_SIZE": "[1,2]"}}
        assert http.post("/publish", json=body).status_code == 409
        assert model in http.request("GET", "/listall", json={"sax_cell": "/sax/test"}).json()
        wait_for(
            lambda: (
                http.request("GET", "/listcell", json={"model": model}).json()["active_replicas"]
                == 1
            ),
            30,
            "tiny2 to load",
        )
        assert http.request("GET", "/listcell", json={"model": model}).json() == {
            "model": model,
            "model_path": "test.TinyLM",
            "checkpoint": "None",
            "max_replicas": 1,
            "active_replicas": 1,
        }
        over = {**TUTORIAL, "model": model, "extra_inputs": {"per_example_max_decode_steps": 9}}
        assert http.post("/generate", json=over).status_code == 400  # MAX_DECODE_STEPS=8 holds

        update = {k: v for k, v in body.items() if k != "overrides"} | {"replicas": 0}
        r = http.put("/update", json=update)
        assert r.status_code == 200 and r.json() == update, r.text
        assert http.get("/listcell", params={"model": model}).json()["max_replicas"] == 0

        r = http.post("/unpublish", json={"model": model})
        assert r.status_code == 200 and r.json() == {"model": model}
        assert http.request("GET", "/listcell", json={"model": model}).status_code == 404
        assert http.post("/unpublish", json={"model": model}).status_code == 404
        bad = http.post("/publish", json={**body, "overrides": "NOVALUE"})
        assert bad.status_code == 400 and "KEY=VALUE" in bad.json()["detail"]


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_client_mistakes_get_their_status(gateway_cell: GatewayCell) -> None:
    chat = {"model": "smollm2", "messages": QUESTION}
    with httpx.Client(base_url=gateway_cell.main.url, timeout=60) as http:
        err = _openai_error(http.post("/v1/chat/completions", json={**chat, "model": "nope"}), 404)
        assert "/sax/test/nope" in err["message"] and err["type"] == "not_found_error"
        r = http.post("/generate", json={**TUTORIAL, "model": "/sax/test/nope"})
        assert r.status_code == 404 and "detail" in r.json()

        err = _openai_error(
            http.post("/v1/chat/completions", json={**chat, "max_tokens": 10**6}), 400
        )
        assert err["param"] == "max_tokens" and "256" in err["message"], err
        err = _openai_error(
            http.post("/v1/chat/completions", json={**chat, "max_tokens": 10**6, "stream": True}),
            400,
        )
        assert err["param"] == "max_tokens"

        r = http.post("/generate", json={"model": TINY, "query": "x", "extra_inputs": {"bogus": 1}})
        assert r.status_code == 400 and "bogus" in r.json()["detail"]
        err = _openai_error(
            http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "top_p": 0.5}), 400
        )
        assert err["param"] == "top_p" and "declares" in err["message"]

        headers = {"content-type": "application/json"}
        for path in ("/generate", "/publish", "/v1/chat/completions", "/v1/completions"):
            r = http.post(path, content=b'{"model": ', headers=headers)
            assert r.status_code == 400, (path, r.text)
            assert "not valid JSON" in json.dumps(r.json()), r.text
        r = http.post("/generate", json={"model": TINY})
        assert r.status_code == 400 and r.json() == {"detail": "query: Field required"}
        err = _openai_error(http.post("/v1/chat/completions", json={"model": "smollm2"}), 400)
        assert err["param"] == "messages"
        for extra in ({"n": 100}, {"tools": [{"type": "function"}]}, {"temperature": -1}):
            _openai_error(http.post("/v1/chat/completions", json={**chat, **extra}), 400)
        r = http.post("/generate", json={"model": "not-an-id", "query": "x"})
        assert r.status_code == 400, r.text
        _openai_error(http.get("/v1/nothing-here"), 404)


def test_full_gateway_429_and_no_replica_503(gateway_cell: GatewayCell) -> None:
    idle = "/sax/test/idle"  # published with no replica: a call waits for one until its deadline
    sax.Publish(idle, "test.TinyLM", "None", 0)
    strict = gateway_cell.strict
    try:
        with httpx.Client(base_url=strict.url, timeout=30) as http:
            results: list[httpx.Response] = []
            waiting = threading.Thread(
                target=lambda: results.append(
                    http.post("/generate", json={"model": idle, "query": "x"})
                )
            )
            waiting.start()
            wait_for(lambda: strict.state.runner.in_flight == 1, 5, "the call to hold the slot")
            err = _openai_error(
                http.post("/v1/completions", json={"model": TINY, "prompt": "x"}), 429
            )
            assert err["type"] == "rate_limit_error"
            assert http.post("/generate", json={"model": TINY, "query": "x"}).status_code == 429
            waiting.join(10)
            assert results[0].status_code == 503, results[0].text
            assert "no replica" in results[0].json()["detail"]
            assert http.post("/generate", json={"model": TINY, "query": "x"}).status_code == 200
    finally:
        sax.Unpublish(idle)


def test_admin_down_is_503_and_health(gateway_cell: GatewayCell) -> None:
    with httpx.Client(base_url=gateway_cell.main.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/health", params={"model": "smollm2"}).status_code == 200
        assert http.get("/health", params={"model": "nope"}).status_code == 404
    with httpx.Client(base_url=gateway_cell.strict.url, timeout=30) as http:
        r = http.request("GET", "/listall", json={"sax_cell": DOWN_CELL})
        assert r.status_code == 503 and "did not answer" in r.json()["detail"], r.text
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        _openai_error(http.get("/v1/models"), 503)


def test_disconnected_stream_stops_its_call(gateway_cell: GatewayCell, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.calls")
    main = gateway_cell.main
    client = _openai(main.url)
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    stream = client.chat.completions.create(
        model="smollm2", messages=story, temperature=0, max_tokens=250, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert main.state.runner.in_flight == 1
    stream.close()
    wait_for(lambda: main.state.runner.in_flight == 0, 5, "the slot to be released")
    wait_for(lambda: "stopped by the gateway" in caplog.text, 5, "the stream call to stop")


def test_metrics_count_requests_by_route_and_status(gateway_cell: GatewayCell) -> None:
    with httpx.Client(base_url=gateway_cell.main.url, timeout=30) as http:
        http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = http.get("/metrics").text
    assert re.search(
        r'sax_gateway_requests_total\{method="POST",route="/v1/completions",status="404"\} \d', text
    ), text
    assert 'sax_gateway_request_duration_seconds_bucket{le="0.005",method="POST",route=' in text
    assert "sax_gateway_calls_in_flight 0.0" in text


def test_python_m_gateway_answers_curl(gateway_cell: GatewayCell, tmp_path) -> None:
    log = tmp_path / "gateway.log"
    env = {**os.environ, "SAX_ROOT": gateway_cell.cluster.root}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port=0", "--host=127.0.0.1"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def port() -> str:
            assert proc.poll() is None, log.read_text()
            m = re.search(r"gateway listening on http://127.0.0.1:(\d+)", log.read_text())
            return m.group(1) if m else ""

        url = f"http://127.0.0.1:{wait_for(port, 30, 'the gateway to listen')}"
        body = json.dumps({**TUTORIAL, "extra_inputs": {"temperature": 0}})
        curl = shutil.which("curl")
        if curl:
            r = subprocess.run(
                [
                    curl,
                    "-s",
                    "-X",
                    "POST",
                    f"{url}/generate",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    body,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            out = r.stdout
        else:
            out = httpx.post(f"{url}/generate", content=body, timeout=60).text
        [[text, score]] = json.loads(out)
        assert "Paris" in text and score < 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
