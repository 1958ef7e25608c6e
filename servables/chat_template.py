"""Chat templates: the checkpoint's Jinja template, rendered the way `transformers` renders it.

A converted checkpoint keeps its tokenizer under `tokenizer/`; `tokenizer_config.json` holds the
`chat_template` (a string, or a list of {"name", "template"} from which "default" is taken) and
the special tokens (`bos_token`, `eos_token`, ...), and a `chat_template.jinja` file next to it
is read when the config has none. The template is rendered in Jinja's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, `loopcontrols`, a `tojson` filter that keeps non-ASCII text,
the `raise_exception(message)` and `strftime_now(format)` helpers, and `{% generation %}` blocks
rendered as plain text, with `messages`, `add_generation_prompt` (True unless asked otherwise)
and the special tokens as variables. The gateway and the engine's tokenizer both render with it.
Import-light: jinja2 is imported when a template is compiled.

A model without a template (a test-mode model published with the checkpoint "None", or a
checkpoint whose tokenizer has none) uses `PLAIN`: one "<role>: <content>" line per message, then
"assistant: ".
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sax.errors import FailedPreconditionError, InvalidArgumentError

if TYPE_CHECKING:
    import jinja2

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

#: A chat message as the template sees it: {"role": ..., "content": ..., ["name": ...]}.
Message = Mapping[str, Any]


def _raise_exception(message: str) -> None:
    import jinja2

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


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks):
        rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
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
        import jinja2

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

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`, ending with the assistant's turn when add_generation_prompt
        (the plain fallback always does). InvalidArgumentError if the template refuses the
        messages (e.g. `raise_exception("roles must alternate")`)."""
        if self.error:
            raise FailedPreconditionError(self.error)
        if self._compiled is None:
            return render_plain(messages)
        import jinja2

        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
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


def special_token_text(value: Any) -> str | None:
    """A special token as a string (tokenizer configs write either "<s>" or {"content": "<s>"})."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def template_source(config: Mapping[str, Any], template_file: str | None = None) -> str | None:
    """The template source of a tokenizer config (its "chat_template", a string or the
    "default" of a named list), else the text of a separate chat_template.jinja; None if
    neither has one."""
    return _config_template(config) or (template_file or None)


def _config_template(config: Mapping[str, Any]) -> str | None:
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
    source = template_source(config, template_file)
    if not source:
        return None
    tokens = {}
    for name in _SPECIAL_TOKENS:
        text = special_token_text(config.get(name))
        if text is not None:
            tokens[name] = text
    return ChatTemplate.compile(source, tokens)


def read_tokenizer_config(tokenizer_dir: str) -> tuple[dict[str, Any], str | None]:
    """A local tokenizer folder's tokenizer_config.json ({} if absent) and chat_template.jinja
    text (None if absent). FailedPreconditionError if the config is not valid JSON."""
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
    return config, template_file


def load_chat_template(tokenizer_dir: str) -> ChatTemplate | None:
    """The template in a local tokenizer folder, None if it has none."""
    return from_tokenizer_config(*read_tokenizer_config(tokenizer_dir))
