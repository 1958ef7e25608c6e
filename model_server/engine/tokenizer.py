"""The tokenizer of a checkpoint: `tokenizer.json` (the `tokenizers` library) plus the special
tokens and chat template of `tokenizer_config.json`.

Special tokens written in a text (e.g. "<|im_start|>") are parsed as themselves, so a prompt
already formatted with the chat template encodes as the model expects.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers

from sax.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads `tokenizer.json` and (optionally) `tokenizer_config.json` and
        `chat_template.jinja` from a local folder. FAILED_PRECONDITION without tokenizer.json."""
        folder = os.fspath(path)
        file = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(file):
            raise FailedPreconditionError(
                f"no {TOKENIZER_FILE} in {folder}; convert the checkpoint again so that it "
                "includes its tokenizer"
            )
        tok = tokenizers.Tokenizer.from_file(file)
        config: dict[str, Any] = {}
        config_file = os.path.join(folder, CONFIG_FILE)
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        template_file = os.path.join(folder, CHAT_TEMPLATE_FILE)
        if not isinstance(template, str) and os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        bos_id = cls._special_id(tok, config.get("bos_token"))
        eos_id = cls._special_id(tok, config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # what the tokenizer.json post-processor does
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        logger.debug("tokenizer %s: bos %s, eos %s, add_bos %s", folder, bos_id, eos_id, add_bos)
        return cls(
            tok,
            bos_id=bos_id,
            eos_ids=() if eos_id is None else (eos_id,),
            add_bos=bool(add_bos),
            chat_template=template if isinstance(template, str) else None,
        )

    @staticmethod
    def _special_id(tok: tokenizers.Tokenizer, entry: Any) -> int | None:
        text = _token_text(entry)
        return None if text is None else tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        """Ids in the vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; BOS first when the tokenizer adds one (or when add_bos says so).
        Special tokens written in the text become their ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos and self.bos_id is not None
        if bos and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens left out unless asked for)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Formats chat messages ({"role", "content"}) with the model's chat template (jinja2,
        sandboxed). FAILED_PRECONDITION when the tokenizer has no template."""
        if not self.chat_template:
            raise FailedPreconditionError(
                "the model's tokenizer has no chat template; format the prompt yourself"
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        tokens = {
            "bos_token": "" if self.bos_id is None else self._tok.id_to_token(self.bos_id),
            "eos_token": self._tok.id_to_token(self.eos_ids[0]) if self.eos_ids else "",
        }
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **tokens
        )
