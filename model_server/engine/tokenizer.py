"""The tokenizer of a checkpoint: `tokenizer.json` (the `tokenizers` library) plus the special
tokens and chat template of `tokenizer_config.json`, read and rendered by `servables.chat_template`.

Special tokens written in a text (e.g. "<|im_start|>") are parsed as themselves, so a prompt
already formatted with the chat template encodes as the model expects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tokenizers

from sax.errors import FailedPreconditionError
from servables.chat_template import read_tokenizer_config, special_token_text, template_source

if TYPE_CHECKING:
    from servables.chat_template import ChatTemplate

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


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
        self._template: ChatTemplate | None = None  # compiled on first use

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
        config, template_file = read_tokenizer_config(folder)
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
            chat_template=template_source(config, template_file),
        )

    @staticmethod
    def _special_id(tok: tokenizers.Tokenizer, entry: Any) -> int | None:
        text = special_token_text(entry)
        return tok.token_to_id(text) if text else None

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
        """Formats chat messages ({"role", "content"}) with the model's chat template
        (`servables.chat_template`). FAILED_PRECONDITION when the tokenizer has no template or
        it does not compile, INVALID_ARGUMENT when it refuses the messages."""
        if not self.chat_template:
            raise FailedPreconditionError(
                "the model's tokenizer has no chat template; format the prompt yourself"
            )
        if self._template is None:
            from servables.chat_template import ChatTemplate

            tokens = {
                "bos_token": "" if self.bos_id is None else self._tok.id_to_token(self.bos_id),
                "eos_token": self._tok.id_to_token(self.eos_ids[0]) if self.eos_ids else "",
            }
            self._template = ChatTemplate.compile(self.chat_template, tokens)
        return self._template.render(messages, add_generation_prompt=add_generation_prompt)
