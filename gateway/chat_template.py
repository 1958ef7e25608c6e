"""Chat templates: the checkpoint's Jinja template, rendered the way `transformers` renders it.

A converted checkpoint keeps its tokenizer under `tokenizer/`; `tokenizer_config.json` holds the
`chat_template` (a string, or a list of {"name", "template"} from which "default" is taken) and
the special tokens (`bos_token`, `eos_token`, ...), and a `chat_template.jinja` file next to it
is read when the config has none. The template is rendered in Jinja's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, `loopcontrols`, a `tojson` filter that keeps non-ASCII text,
the `raise_exception(message)` and `strftime_now(format)` helpers, and `{% generation %}` blocks
rendered as plain text, with `messages`, `add_generation_prompt=True` and the special tokens as
variables.

A model without a template (a test-mode model published with the checkpoint "None", or a
checkpoint whose tokenizer has none) uses `PLAIN`: one "<role>: <content>" line per message, then
"assistant: ".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sax.errors import FailedPreconditionError, InvalidArgumentError

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

#: A chat message as the template sees it: {"role": ..., "content": ..., ["name": ...]}.
Message = Mapping[str, Any]


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks):
    rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template with its special tokens; `render(messages)` gives the prompt."""

    # The Jinja source ("" for the plain fallback).
    source: str
    # bos_token, eos_token, ... as strings.
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    # Why the template cannot be used (it did not compile); render raises it.
    error: str = ""
    _compiled: jinja2.Template | None = field(default=None, repr=False, compare=False)

    @classmethod
    def compile(cls, source: str, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """Compiles `source`; a template that is not valid Jinja gives one whose `render` raises
        FailedPreconditionError saying why."""
        try:
            compiled = _environment().from_string(source)
        except jinja2.TemplateError as e:
            logger.warning("a chat template does not compile: %s", e)
            return cls(
                source=source,
                error=f"the model's chat template does not compile ({e}); fix "
                "tokenizer_config.json in the checkpoint or use /v1/completions with a formatted "
                "prompt",
            )
        return cls(source=source, special_tokens=dict(special_tokens or {}), _compiled=compiled)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for `messages`, ending with the assistant's turn. InvalidArgumentError if the
        template refuses the messages (e.g. `raise_exception("roles must alternate")`)."""
        if self.error:
            raise FailedPreconditionError(self.error)
        if self._compiled is None:
            return render_plain(messages)
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise InvalidArgumentError(
                f"the model's chat template refused the messages: {e}"
            ) from e


def render_plain(messages: Sequence[Message]) -> str:
    """The fallback format: "<role>: <content>\\n" per message, then "assistant: "."""
    lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}\n" for m in messages]
    return "".join(lines) + "assistant: "


#: The fallback for models without a template.
PLAIN = ChatTemplate(source="")


def _token_text(value: Any) -> str | None:
    """A special token as a string (tokenizer configs write either "<s>" or {"content": "<s>"})."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_source(config: Mapping[str, Any]) -> str | None:
    raw = config.get("chat_template")
    if isinstance(raw, str) and raw.strip():
        return raw
    if isinstance(raw, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        source = named.get("default")
        if isinstance(source, str) and source.strip():
            return source
    return None


def from_tokenizer_config(
    config: Mapping[str, Any], template_file: str | None = None
) -> ChatTemplate | None:
    """The template of a tokenizer config (or of a separate chat_template.jinja text); None if
    there is none."""
    source = _template_source(config) or (template_file or None)
    if not source:
        return None
    tokens = {}
    for name in _SPECIAL_TOKENS:
        text = _token_text(config.get(name))
        if text is not None:
            tokens[name] = text
    return ChatTemplate.compile(source, tokens)


def load_chat_template(tokenizer_dir: str) -> ChatTemplate | None:
    """The template in a local tokenizer folder, None if it has none."""
    config: dict[str, Any] = {}
    path = os.path.join(tokenizer_dir, TOKENIZER_CONFIG)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FailedPreconditionError(
                f"{path} is not valid JSON ({e}); convert the checkpoint again"
            ) from e
        if isinstance(loaded, dict):
            config = loaded
    template_file = None
    jinja_path = os.path.join(tokenizer_dir, TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template_file = f.read()
    return from_tokenizer_config(config, template_file)
