"""Parts of the gateway that need no cell: chat templates, overrides, error mapping, settings."""

from __future__ import annotations

import json

import grpc
import pytest

from gateway.__main__ import parse_settings
from gateway.catalog import ModelCatalog, ModelInfo
from gateway.config import GatewaySettings
from gateway.http_errors import http_status
from gateway.sax_http import parse_overrides
from sax import errors
from servables.chat_template import PLAIN, ChatTemplate, from_tokenizer_config, load_chat_template
from servables.registry import get as get_config

# SmolLM2-Instruct's template, as its converted checkpoint keeps it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
USER = [{"role": "user", "content": "Hi"}]


def test_smollm2_template_renders_like_transformers() -> None:
    template = from_tokenizer_config({"chat_template": SMOLLM2_TEMPLATE, "eos_token": "<|im_end|>"})
    assert template is not None
    assert template.render(USER) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}, *USER]
    assert template.render(system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_template_helpers_tokens_and_blocks() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% endfor %}"
    )
    template = from_tokenizer_config({"chat_template": source, "bos_token": {"content": "<s>"}})
    assert template is not None
    out = template.render([{"role": "user", "content": "café"}])
    assert out == '<s>{"role": "user", "content": "café"}'  # trim_blocks ate the newline
    with pytest.raises(errors.InvalidArgumentError, match="no tools here"):
        template.render([{"role": "tool", "content": "x"}])


def test_named_templates_files_and_fallbacks(tmp_path) -> None:
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert from_tokenizer_config({"chat_template": named}).render(USER) == "D"
    assert from_tokenizer_config({"bos_token": "<s>"}) is None
    assert load_chat_template(str(tmp_path)) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_chat_template(str(tmp_path)).render(USER) == "Hi!"
    assert PLAIN.render([{"role": "system", "content": "S"}, *USER]) == (
        "system: S\nuser: Hi\nassistant: "
    )


def test_sandbox_and_broken_templates_are_refused() -> None:
    escape = ChatTemplate.compile("{{ messages.__class__.__mro__ }}")
    with pytest.raises(errors.InvalidArgumentError):
        escape.render(USER)
    broken = ChatTemplate.compile("{% for m in messages %}")
    with pytest.raises(errors.FailedPreconditionError, match="does not compile"):
        broken.render(USER)


def test_overrides_parse_at_the_first_equals_sign() -> None:
    assert parse_overrides("BATCH_SIZE=4  BUCKET_KEYS=[128,256] X=a=b") == {
        "BATCH_SIZE": "4",
        "BUCKET_KEYS": "[128,256]",
        "X": "a=b",
    }
    assert parse_overrides(None) == {}
    for bad in ("NOVALUE", "=4"):
        with pytest.raises(errors.InvalidArgumentError, match="KEY=VALUE"):
            parse_overrides(bad)


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (errors.InvalidArgumentError("x"), 400),
        (errors.FailedPreconditionError("x"), 400),
        (errors.NotFoundError("x"), 404),
        (errors.AlreadyExistsError("x"), 409),
        (errors.ResourceExhaustedError("x"), 429),
        (errors.UnavailableError("x"), 503),
        (errors.DeadlineExceededError("x"), 504),
        (errors.PermissionDeniedError("x"), 403),
        (errors.InternalError("x"), 500),
        (errors.error_for_code(grpc.StatusCode.DATA_LOSS, "x"), 500),
    ],
)
def test_sax_errors_map_to_http_statuses(err: errors.SaxError, status: int) -> None:
    assert http_status(err) == status


def test_model_names_resolve_in_the_default_cell() -> None:
    catalog = ModelCatalog("/sax/test", admin_timeout=1, ttl_s=1)
    assert catalog.resolve_name("smollm2") == "/sax/test/smollm2"
    assert catalog.resolve_name("/sax/other/m") == "/sax/other/m"
    for bad in ("", "a/b", "/sax/test"):
        with pytest.raises(errors.InvalidArgumentError):
            catalog.resolve_name(bad)


def test_model_info_limits_come_from_the_config() -> None:
    smollm2 = ModelInfo(
        "/sax/test/m", "llama.SmolLM2_135M", "x", config=get_config("llama.SmolLM2_135M")
    )
    assert smollm2.max_decode_steps() == 256 and smollm2.default_max_tokens() == 256
    assert {"temperature", "top_p", "seed", "stop"} <= smollm2.declared_extra_inputs()
    tiny = ModelInfo("/sax/test/t", "test.TinyLM", "None", config=get_config("test.TinyLM"))
    assert "top_p" not in tiny.declared_extra_inputs() and tiny.count_tokens("x") is None
    unknown = ModelInfo("/sax/test/u", "other.Model", "None")
    assert unknown.declared_extra_inputs() is None and unknown.default_max_tokens() is None


def test_settings_and_flags_are_checked(capsys) -> None:
    settings, level = parse_settings(["--port=0", "--sax_cell=/sax/c", "--timeout=5"])
    assert (settings.port, settings.sax_cell, settings.timeout, level) == (0, "/sax/c", 5.0, "INFO")
    assert parse_settings([])[0].port == 8888
    for argv in (["--sax_cell=bad"], ["--timeout=0"], ["--log_level=LOUD"]):
        with pytest.raises(SystemExit) as e:
            parse_settings(argv)
        assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(errors.InvalidArgumentError):
        GatewaySettings(max_concurrent_calls=0)


def test_claimed_call_slots_stay_held_until_the_worker_is_done() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gateway.calls import CallRunner

    runner = CallRunner(max_concurrent_calls=2, timeout=5)
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool, runner.reserve(2) as reservation:
        future = pool.submit(gate.wait, 5)
        future.add_done_callback(reservation.claim())
        reservation.release()  # the client went away: the unclaimed slot comes back at once
        assert runner.in_flight == 1  # the running call still holds its slot
        gate.set()
        future.result()
    assert runner.in_flight == 0
    runner.shutdown()
