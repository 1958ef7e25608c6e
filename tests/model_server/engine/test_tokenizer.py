"""Tokenizer wrapper (tokenizer.json + tokenizer_config.json) and the incremental detokenizer."""

from __future__ import annotations

import json
import pathlib

import pytest

from model_server.engine.detokenizer import Detokenizer
from model_server.engine.tokenizer import Tokenizer
from sax.errors import FailedPreconditionError
from tests.model_server.engine.fakes import BOS, EOS, IM_END, IM_START, write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_encode_adds_bos_and_parses_special_tokens(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (BOS, (EOS,), True)
    assert tok.encode("hé") == [BOS, 104, 0xC3, 0xA9]
    assert tok.encode("hé", add_bos=False) == [104, 0xC3, 0xA9]
    assert tok.encode("<s>a") == [BOS, 97]  # not twice
    assert tok.encode("<|im_start|>x<|im_end|>") == [BOS, IM_START, 120, IM_END]
    assert tok.decode([BOS, 104, IM_END, 105]) == "hi"
    assert tok.decode([104, IM_END], skip_special_tokens=False) == "h<|im_end|>"


def test_chat_template(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}])
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text).count(IM_START) == 2


def test_add_bos_follows_the_post_processor_when_unset(tmp_path: pathlib.Path) -> None:
    folder = write_tokenizer(tmp_path)
    config = {"bos_token": "<s>", "eos_token": "</s>"}  # no add_bos_token, no chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_dir(folder)
    assert not tok.add_bos  # this tokenizer.json has no post-processor
    assert tok.encode("a") == [97]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_missing_tokenizer_is_failed_precondition(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FailedPreconditionError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def pieces(tok: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tok.decode, tok.encode("prompt"), stop)
    out = []
    for t in tok.encode(text, add_bos=False):
        out.append(detok.add(t))
        if detok.stopped:
            break
    out.append(detok.flush())
    return out, detok


def test_detokenizer_never_splits_a_character(tok: Tokenizer) -> None:
    text = "héllo wörld 🎉 ok"
    out, detok = pieces(tok, text)
    assert "".join(out) == text == detok.text
    assert not any("\ufffd" in p for p in out)
    assert out[:4] == ["h", "", "é", "l"]  # "é" is two byte tokens


def test_detokenizer_flushes_an_incomplete_character(tok: Tokenizer) -> None:
    detok = Detokenizer(tok.decode)
    assert detok.add(104) == "h"
    assert detok.add(0xC3) == ""
    assert detok.flush() == "\ufffd"


def test_stop_string_ends_the_text_before_it(tok: Tokenizer) -> None:
    out, detok = pieces(tok, "Hello, Wor: done", stop=("Wor:",))
    assert detok.stopped and detok.text == "Hello, "
    assert "".join(out) == "Hello, "
    # "W", "o", "r" were held back while they could start the stop string.
    assert out[:8] == ["H", "e", "l", "l", "o", ",", " ", ""]


def test_held_text_is_released_when_no_stop_follows(tok: Tokenizer) -> None:
    out, detok = pieces(tok, "ab. abc", stop=("abx",))
    assert not detok.stopped and "".join(out) == "ab. abc"
    assert out[:3] == ["", "", "ab."]


def test_the_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    _, detok = pieces(tok, "one\n\ntwo END", stop=("END", "\n\n"))
    assert detok.text == "one"
    _, detok = pieces(tok, "stop at once", stop=("stop",))
    assert detok.stopped and detok.text == ""
