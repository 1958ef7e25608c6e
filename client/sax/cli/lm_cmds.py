"""saxutil commands that query language models: lm.generate and lm.score."""

from __future__ import annotations

import argparse
import json
import sys

import sax
from sax.cli.common import UsageError
from sax.cli.table import format_table
from sax.lm import StreamItem, merge_stream_items


def parse_extra(text: str) -> sax.ModelOptions:
    """Saxml's -extra syntax, "k0:v0,k1:v1": a quoted value ('x' or "x") is a string input, a
    number a scalar input, anything else a string input."""
    options = sax.ModelOptions()
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"-extra item {part!r} is not KEY:VALUE; write e.g. -extra=temperature:0.2,"
                "stop:'\\n'"
            )
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            options.SetExtraInputString(key, value[1:-1])
            continue
        try:
            options.SetExtraInput(key, float(value))
        except ValueError:
            options.SetExtraInputString(key, value)
    return options


def _options(args: argparse.Namespace) -> sax.ModelOptions:
    options = parse_extra(args.extra)
    if args.sax_timeout:
        options.SetTimeout(args.sax_timeout)
    return options


def _score(value: float) -> str:
    return f"{value:.8G}"


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stream(lm: sax.LanguageModel, query: str, options: sax.ModelOptions) -> None:
    texts: list[str] = []
    scores: list[list[float]] = []
    printed = ""

    def callback(last: bool, items: list[StreamItem]) -> None:
        nonlocal printed
        if last:
            return
        merge_stream_items(texts, items)
        for i, (_text, _prefix_len, item_scores) in enumerate(items):
            while len(scores) <= i:
                scores.append([])
            scores[i] = item_scores
        if len(texts) == 1:
            text = texts[0]
            _write(text[len(printed) :] if text.startswith(printed) else "\n" + text)
            printed = text

    lm.GenerateStream(query, callback, options)
    if len(texts) == 1:
        _write("\n")
    else:
        _write("".join(f"[{i}] {t}\n" for i, t in enumerate(texts)))
    _write("Scores: " + ", ".join(_score(s[0]) if s else "-" for s in scores) + "\n")


def cmd_generate(args: argparse.Namespace) -> int:
    """lm.generate [-n N] [-stream] [-terse] [-extra=k:v,...] <id> <query or ->"""
    if args.stream and (args.terse or args.n or args.json):
        raise UsageError("lm.generate: -stream cannot be combined with -terse, -n or -json")
    if args.n < 0:
        raise UsageError(f"lm.generate: -n must be >= 0, got {args.n}")
    query = sys.stdin.read().rstrip("\n") if args.query == "-" else args.query
    options = _options(args)
    lm = sax.Model(args.model_id).LM()
    if args.stream:
        _stream(lm, query, options)
        return 0
    samples = lm.Generate(query, options)
    if args.n:
        samples = samples[: args.n]
    if args.json:
        _write(json.dumps([{"text": t, "score": s} for t, s in samples]) + "\n")
    elif args.terse:
        _write("".join(f"{t}\n" for t, _ in sorted(samples, key=lambda x: -x[1])))
    else:
        _write(format_table(["generate", "Score"], [[t, _score(s)] for t, s in samples]))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """lm.score [-extra=k:v,...] <id> <prefix> <suffix...>"""
    lm = sax.Model(args.model_id).LM()
    logp = lm.Score(args.prefix, list(args.suffixes), _options(args))
    per = max(1, len(logp) // len(args.suffixes))
    groups = [logp[i * per : (i + 1) * per] for i in range(len(args.suffixes))]
    if args.json:
        record = [{"suffix": s, "logp": g} for s, g in zip(args.suffixes, groups, strict=True)]
        _write(json.dumps(record) + "\n")
        return 0
    headers = ["Suffix"] + (["Score"] if per == 1 else [f"Score {i}" for i in range(per)])
    rows = [
        [s, *(_score(v) for v in g)] + [""] * (per - len(g))
        for s, g in zip(args.suffixes, groups, strict=True)
    ]
    _write(format_table(headers, rows))
    return 0
