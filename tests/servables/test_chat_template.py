"""Chat templates, rendered one way for the gateway and the engine's tokenizer."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.chat_template import (
    ChatTemplate,
    read_tokenizer_config,
    special_token_text,
    template_source,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER = [{"role": "user", "content": "Hi"}]


def test_the_generation_prompt_can_be_left_out() -> None:
    template = ChatTemplate.compile(CHATML)
    assert template.render(USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(USER, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_template_errors() -> None:
    with pytest.raises(FailedPreconditionError, match="does not compile"):
        ChatTemplate.compile("{% for %}").render(USER)
    refusing = ChatTemplate.compile("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidArgumentError, match="roles must alternate"):
        refusing.render(USER)


def test_tokenizer_folder(tmp_path: pathlib.Path) -> None:
    assert read_tokenizer_config(str(tmp_path)) == ({}, None)
    config = {
        "chat_template": [{"name": "default", "template": "D"}],
        "bos_token": {"content": "<s>"},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("F")
    loaded, template_file = read_tokenizer_config(str(tmp_path))
    assert (loaded, template_file) == (config, "F")
    assert template_source(loaded, template_file) == "D"
    assert template_source({}, template_file) == "F"
    assert template_source({"chat_template": " "}) is None
    assert special_token_text(loaded["bos_token"]) == "<s>"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FailedPreconditionError, match="not valid JSON"):
        read_tokenizer_config(str(tmp_path))


def test_importing_it_does_not_import_jinja() -> None:
    code = "import sys, servables.chat_template; assert 'jinja2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
