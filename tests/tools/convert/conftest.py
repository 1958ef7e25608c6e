"""Fixtures of the converter tests: small random models (the real SmolLM2 GGUF file comes
from tests/conftest.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    """A tiny random Llama (transformers), untied."""
    from tests.tools.convert.builders import tiny_llama

    return tiny_llama(tie=False)


@pytest.fixture(scope="session")
def tiny_tied_model() -> Any:
    """A tiny random Llama with tied embeddings."""
    from tests.tools.convert.builders import tiny_llama

    return tiny_llama(tie=True, seed=1)
