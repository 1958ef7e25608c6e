"""The prompt sets: random prompts of a fixed token length (fixed output length, end-of-sequence
ignored) and the chat set of `benchmarks/prompts/chat.jsonl` (the model's chat template, output
up to a limit, ending at end-of-sequence)."""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

CHAT_FILE = pathlib.Path(__file__).resolve().parents[1] / "prompts" / "chat.jsonl"
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


class TextTokenizer(Protocol):
    """What the workloads need of `model_server.engine.tokenizer.Tokenizer`."""

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str: ...


@dataclass(frozen=True)
class Prompt:
    """One request of a workload."""

    text: str
    # The prompt's token ids as the model's tokenizer encodes `text`.
    token_ids: tuple[int, ...]
    # Most output tokens.
    max_tokens: int
    # True: exactly max_tokens are generated (end-of-sequence ignored).
    fixed_output: bool


def _word_tokens(tokenizer: TextTokenizer, limit: int = 20000) -> list[int]:
    """Ids of tokens that are one lower-case word with a leading space and encode back alone."""
    words = []
    for token_id in range(limit):
        text = tokenizer.decode([token_id])
        word = len(text) > 2 and text[0] == " " and text[1:].isalpha() and text[1:].islower()
        if word and tokenizer.encode(text, add_bos=False) == [token_id]:
            words.append(token_id)
    return words


def random_prompts(
    tokenizer: TextTokenizer, n: int, prompt_len: int, output_len: int, seed: int = 0
) -> list[Prompt]:
    """n prompts of random words that encode to exactly `prompt_len` tokens (BOS included when
    the tokenizer adds one), each asking for exactly `output_len` tokens."""
    rng = random.Random(seed)
    words = _word_tokens(tokenizer)
    if len(words) < 100:
        raise RuntimeError(f"the tokenizer has only {len(words)} plain word tokens")
    bos = len(tokenizer.encode("x")) - len(tokenizer.encode("x", add_bos=False))
    out: list[Prompt] = []
    while len(out) < n:
        ids = [rng.choice(words) for _ in range(prompt_len - bos)]
        text = tokenizer.decode(ids).lstrip()
        encoded = tokenizer.encode(text)
        if len(encoded) == prompt_len:  # almost always; else draw again
            out.append(Prompt(text, tuple(encoded), output_len, True))
    return out


def chat_prompts(
    tokenizer: TextTokenizer, n: int, max_tokens: int, path: pathlib.Path = CHAT_FILE
) -> list[Prompt]:
    """The first n chat prompts of the file (cycled when n is larger), in the chat template."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": lines[i % len(lines)]["prompt"]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out.append(Prompt(text, tuple(tokenizer.encode(text)), max_tokens, False))
    return out


def quote_prompts(
    tokenizer: TextTokenizer, n: int, max_tokens: int, docs: pathlib.Path = DOCS
) -> list[Prompt]:
    """n chat prompts asking the model to repeat a paragraph of this project's docs word for
    word (a workload whose output repeats its prompt, as summaries, edits and extraction do),
    in the chat template, ending at end-of-sequence."""
    paragraphs = []
    for path in sorted(docs.glob("*.md")):
        for block in path.read_text().split("\n\n"):
            text = " ".join(block.split())
            if 300 <= len(text) <= 700 and not text.startswith(("#", "|", "```")):
                paragraphs.append(text)
    if not paragraphs:
        raise RuntimeError(f"no paragraph of 300 to 700 characters in {docs}")
    out = []
    for i in range(n):
        ask = f"Repeat the following text word for word.\n\n{paragraphs[i % len(paragraphs)]}"
        messages = [{"role": "user", "content": ask}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out.append(Prompt(text, tuple(tokenizer.encode(text)), max_tokens, False))
    return out
