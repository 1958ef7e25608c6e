"""Request bodies of the OpenAI-compatible routes (pydantic), and the refused features.

Unknown fields are accepted and ignored (clients send `user`, `metadata`, ...). Fields that would
change the answer in a way the cell cannot honour are refused with 400: `logprobs`,
`top_logprobs`, `tools`, `functions`, `tool_choice`, a `response_format` other than text,
`best_of` > 1, non-zero `presence_penalty` / `frequency_penalty` / `min_p`, `logit_bias`,
`suffix`, and non-text message parts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sax.errors import InvalidArgumentError

#: Most completions per request (`n`).
MAX_N = 16
#: Most stop strings per request.
MAX_STOP = 16


class StreamOptions(BaseModel):
    """`stream_options`."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Sampling fields left out take
    the model's defaults (OpenAI's defaults, such as temperature 1, are not applied)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description='"/sax/<cell>/<model>", or "<model>" in the gateway\'s cell')
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1: no limit")
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    speculative_tokens: int = Field(
        default=0, ge=0, description="draft tokens per step by prompt lookup; 0: none"
    )
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """InvalidArgumentError for a field the gateway cannot honour."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidArgumentError(f"{name} is not supported; leave it out or set it to 0")
        if self.logit_bias:
            raise InvalidArgumentError("logit_bias is not supported; leave it out")
        if self.min_p:
            raise InvalidArgumentError("min_p is not supported; leave it out or set it to 0")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise InvalidArgumentError(f"stop takes at most {MAX_STOP} strings")
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if extra.get(name):
                raise InvalidArgumentError(f"{name} is not supported by this gateway")
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise InvalidArgumentError("response_format other than text is not supported")

    def stop_strings(self) -> list[str]:
        """The stop strings, empty ones dropped."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def wants_usage_chunk(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise InvalidArgumentError("logprobs is not supported; leave it out")
        if self.best_of is not None and self.best_of > 1:
            raise InvalidArgumentError("best_of is not supported; use n")
        if self.suffix:
            raise InvalidArgumentError("suffix is not supported; leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidArgumentError("prompt must not be an empty list")
        if isinstance(self.prompt, list) and len(self.prompt) * self.n > MAX_N:
            raise InvalidArgumentError(
                f"{len(self.prompt)} prompts x n={self.n} exceeds {MAX_N} completions per request"
            )

    def prompts(self) -> list[str]:
        """The prompts as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    """A part of a message's content."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """{"role", "content"[, "name"]} with the content parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidArgumentError(
                        f"message content of type {part.type!r} is not supported; send text"
                    )
                texts.append(part.text)
            content = "".join(texts)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise InvalidArgumentError("logprobs is not supported; leave it out")

    def token_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens."""
        return self.max_completion_tokens or self.max_tokens
