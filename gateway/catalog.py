"""What the gateway knows of a published model: its config, chat template and tokenizer.

`ModelCatalog.get(model_id)` asks the admin for the model's record (`sax.GetPublished`) at most
every `model_cache_ttl_s` seconds, and keeps a stale record while the admin does not answer. From
the record it derives, once per (model, checkpoint):
- the servable config from the registry with the publish overrides applied (None when this
  gateway's registry does not know the config name): the declared extra inputs and the decode
  limits;
- the chat template and the tokenizer (for approximate token counts) from the checkpoint's
  `tokenizer/` folder (local or gs://). A test-mode model, the checkpoint "None", or a checkpoint
  the gateway cannot read (logged) gets the plain template and no tokenizer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sax
from sax.errors import DeadlineExceededError, SaxError, UnavailableError
from sax.naming import parse_cell, parse_model
from servables.chat_template import PLAIN, ChatTemplate, load_chat_template
from servables.registry import get as get_config
from servables.servable_config import ServableConfig, apply_overrides

logger = logging.getLogger(__name__)

MAX_DECODE_STEPS = "per_example_max_decode_steps"


@dataclass(frozen=True)
class ModelInfo:
    """A published model as the gateway uses it."""

    model_id: str
    # Servable config name, e.g. "llama.SmolLM2_135M".
    model_path: str
    checkpoint_path: str
    overrides: Mapping[str, str] = field(default_factory=dict)
    # The registered config with the overrides applied; None if unknown here.
    config: ServableConfig | None = None
    chat_template: ChatTemplate = PLAIN
    # A `tokenizers.Tokenizer`, or None.
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def declared_extra_inputs(self) -> frozenset[str] | None:
        """The extra-input keys the config declares; None if the config is unknown."""
        return None if self.config is None else frozenset(self.config.extra_inputs)

    def max_decode_steps(self) -> int | None:
        """The most tokens one request may ask for (MAX_DECODE_STEPS); None if unknown."""
        return None if self.config is None else self.config.max_decode_steps

    def default_max_tokens(self) -> int | None:
        """Tokens generated when a request sets no limit; None if unknown."""
        if self.config is None:
            return None
        limit = self.config.max_decode_steps
        default = self.config.extra_inputs.get(MAX_DECODE_STEPS)
        if isinstance(default, (int, float)) and default > 0:
            return max(1, min(int(default), limit))
        return limit

    def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` by the checkpoint's tokenizer (special tokens in the text count as
        one each); None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


@dataclass
class _Entry:
    info: ModelInfo
    fetched: float


def _load_tokenizer(tokenizer_dir: str) -> Any:
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


class ModelCatalog:
    """Thread-safe cache of `ModelInfo` by model id; its methods block (run them in a thread)."""

    def __init__(self, cell: str, admin_timeout: float, ttl_s: float) -> None:
        self._cell = parse_cell(cell).full
        self._admin_timeout = admin_timeout
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # (model_id, model_path, checkpoint, overrides) -> (config, template, tokenizer)
        self._derived: dict[tuple[Any, ...], tuple[Any, ChatTemplate, Any]] = {}

    @property
    def cell(self) -> str:
        """The default cell, e.g. "/sax/test"."""
        return self._cell

    def resolve_name(self, name: str) -> str:
        """The full model id of an OpenAI model name: "/sax/c/m" as is, "m" in the default cell.
        InvalidArgumentError for a malformed name."""
        name = name.strip()
        full = name if name.startswith("/") else f"{self._cell}/{name}"
        return parse_model(full).full

    def get(self, model_id: str) -> ModelInfo:
        """The model's info; NotFoundError if it is not published."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(model_id)
        if entry is not None and now - entry.fetched < self._ttl_s:
            return entry.info
        try:
            published = sax.GetPublished(model_id, timeout=self._admin_timeout)
        except (UnavailableError, DeadlineExceededError) as e:
            if entry is None:
                raise
            logger.warning("admin did not answer for %s (%s); using its last record", model_id, e)
            return entry.info
        except SaxError:
            with self._lock:
                self._entries.pop(model_id, None)
            raise
        model = published.model
        info = self._derive(
            model.model_id, model.model_path, model.checkpoint_path, dict(model.overrides)
        )
        with self._lock:
            self._entries[model_id] = _Entry(info, time.monotonic())
        return info

    def _derive(
        self, model_id: str, model_path: str, checkpoint: str, overrides: dict[str, str]
    ) -> ModelInfo:
        key = (model_id, model_path, checkpoint, tuple(sorted(overrides.items())))
        with self._lock:
            derived = self._derived.get(key)
        if derived is None:
            config = _config(model_id, model_path, overrides)
            template, tokenizer = PLAIN, None
            if checkpoint not in ("", "None") and not (config is not None and config.test_mode):
                template, tokenizer = _from_checkpoint(model_id, checkpoint)
            derived = (config, template, tokenizer)
            with self._lock:
                self._derived = {k: v for k, v in self._derived.items() if k[0] != model_id}
                self._derived[key] = derived
        config, template, tokenizer = derived
        return ModelInfo(
            model_id=model_id,
            model_path=model_path,
            checkpoint_path=checkpoint,
            overrides=overrides,
            config=config,
            chat_template=template,
            tokenizer=tokenizer,
        )


def _config(model_id: str, model_path: str, overrides: dict[str, str]) -> ServableConfig | None:
    try:
        return apply_overrides(get_config(model_path), overrides)
    except SaxError as e:
        logger.warning("config %s of %s is not usable here (%s)", model_path, model_id, e)
        return None


def _from_checkpoint(model_id: str, checkpoint: str) -> tuple[ChatTemplate, Any]:
    from servables.checkpoint import open_checkpoint

    try:
        tokenizer_dir = open_checkpoint(checkpoint).tokenizer_dir()
        template = load_chat_template(tokenizer_dir)
        tokenizer = _load_tokenizer(tokenizer_dir)
    except Exception as e:  # noqa: BLE001 - any failure here degrades to the plain template
        logger.warning(
            "cannot read the tokenizer of %s from %s (%s); chat uses the plain template and "
            "token counts are left out",
            model_id,
            checkpoint,
            e,
        )
        return PLAIN, None
    if template is None:
        logger.info(
            "checkpoint %s of %s has no chat template; using the plain one", checkpoint, model_id
        )
        return PLAIN, tokenizer
    logger.info("read the chat template and tokenizer of %s from %s", model_id, checkpoint)
    return template, tokenizer
