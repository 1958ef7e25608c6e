"""The base of the decoder families' servable configs (`DecoderConfig`): the serving fields the
engine reads (queue, token budget, paged KV cache, threads, quantization), their validation and
the memory estimate, whatever the architecture. A family (`servables.configs.llama`,
`servables.configs.bloom`) adds its architecture fields, flat so that publish overrides
(NUM_LAYERS=2) reach them, and `architecture()`, which gathers them.

Import-light (no torch).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sax.errors import InvalidArgumentError
from servables import memory, platform
from servables.sampling_params import SPECULATIVE_TOKENS
from servables.servable_config import Architecture, ServableConfig

# The extra input holding the stop string (or a JSON list of stop strings).
STOP = "stop"
# The extra input that makes end-of-sequence tokens not end a sample (non-zero: ignore them).
IGNORE_EOS = "ignore_eos"
# Group sizes QUANTIZATION=int4 takes (the torch CPU kernel's).
INT4_GROUP_SIZES = (32, 64, 128, 256)


def default_extra_inputs(
    temperature: float, top_k: float, top_p: float, max_decode_steps: int
) -> Mapping[str, Any]:
    """Extra inputs a request may set, with their defaults.

    temperature: 0 is greedy. top_k: keep the k most likely tokens, 0 keeps all. top_p: nucleus
    mass, 1.0 keeps all. repetition_penalty: 1.0 is none. per_example_max_decode_steps: capped by
    MAX_DECODE_STEPS. seed: 0 draws a fresh seed per request. stop: a stop string, or a JSON list
    of them; "" is none. ignore_eos: non-zero keeps generating past end-of-sequence tokens (fixed
    output lengths, as benchmarks use). speculative_tokens: draft tokens per decode step by
    prompt lookup, checked by the model in the same pass (0: none; it pays when the output
    repeats the prompt: summaries, edits, extraction).
    """
    return types.MappingProxyType(
        {
            "temperature": float(temperature),
            "top_k": float(top_k),
            "top_p": float(top_p),
            "repetition_penalty": 1.0,
            "per_example_max_decode_steps": float(max_decode_steps),
            "seed": 0.0,
            STOP: "",
            IGNORE_EOS: 0.0,
            SPECULATIVE_TOKENS: 0.0,
        }
    )


@dataclass(frozen=True)
class DecoderConfig(ServableConfig):
    """A decoder-only transformer served by the engine. Subclasses (one per family) add the
    architecture fields and `architecture()`; the fields here are how it is served."""

    # Cut over-long prompts to INPUT_SEQ_LEN (keeping the end) instead of refusing them with
    # INVALID_ARGUMENT (Saxml's FAIL_ON_INPUT_TRUNCATION, inverted).
    truncate_prompt: bool = False
    # Requests waiting for a batch slot; more are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 64
    # Tokens one engine step runs at most (MAX_NUM_BATCHED_TOKENS, vLLM's name): a decode row
    # for every running sample, the rest for prompts, which backends that can (torch) split
    # into chunks over several steps; 0: no limit (every prompt that finds slots runs whole).
    # Smaller keeps decodes flowing while long prompts arrive; larger starts prompts sooner.
    max_num_batched_tokens: int = 2048
    # The paged KV cache (backends that page it: torch): positions per block (KV_BLOCK_SIZE),
    # positions in all (KV_CACHE_TOKENS; 0: every sequence of the largest batch at full length,
    # so no request is ever preempted), and whether prompts reuse the cached blocks of a prefix
    # they share with earlier prompts (PREFIX_CACHING).
    kv_block_size: int = 16
    kv_cache_tokens: int = 0
    prefix_caching: bool = True
    # Intra-op threads of the torch backend on a CPU (CPU_THREADS): 0 picks them while serving
    # (all cores, or half when a busy neighbour makes that faster); N: always N.
    cpu_threads: int = 0
    # Float32 products of few rows on a CPU (CPU_GEMM): "auto" measures, at the first step, a
    # kernel built for the machine against torch's BLAS on the model's weights and uses it for
    # the row counts where it is faster; "torch" always uses torch's.
    cpu_gemm: str = "auto"
    # QUANTIZATION=int4: input columns sharing one scale and zero (QUANTIZATION_GROUP_SIZE; 32,
    # 64, 128 or 256, dividing model_dim, hidden_dim and num_heads x head_dim). Smaller is more
    # accurate and spends more on scales (4 bytes a group).
    quantization_group_size: int = 32
    # With QUANTIZATION int8 or int4, how the output projection is served (LM_HEAD_QUANTIZATION):
    # "int8", "int4" (in QUANTIZATION_GROUP_SIZE groups) or "none" (in `dtype`). Tied embeddings
    # keep their float table for the lookup and serve the head from a quantized copy. int8 by
    # default: on SmolLM2-135M with int4 layers, an int4 head cut the greedy-token agreement
    # with float32 from 98% to 85%, an int8 head kept 97%.
    lm_head_quantization: str = "int8"

    dtype: str = "bfloat16"
    batch_sizes: tuple[int, ...] = (1,)
    input_seq_len: int = 128
    max_decode_steps: int = 32
    num_samples: int = 1
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.5, 200, 0.95, 128)
    )
    chips: frozenset[str] = platform.GPU_CHIPS | {"cpu"}

    OVERRIDE_ALIASES = types.MappingProxyType(
        {
            **ServableConfig.OVERRIDE_ALIASES,
            "TRUNCATE_PROMPT": "truncate_prompt",
            "MAX_QUEUE": "max_queue",
            "MAX_NUM_BATCHED_TOKENS": "max_num_batched_tokens",
            "KV_BLOCK_SIZE": "kv_block_size",
            "KV_CACHE_TOKENS": "kv_cache_tokens",
            "PREFIX_CACHING": "prefix_caching",
            "CPU_THREADS": "cpu_threads",
            "CPU_GEMM": "cpu_gemm",
            "QUANTIZATION_GROUP_SIZE": "quantization_group_size",
            "LM_HEAD_QUANTIZATION": "lm_head_quantization",
        }
    )

    def architecture(self) -> Architecture:
        """The architecture fields as one description (each family's)."""
        raise NotImplementedError

    @property
    def slot_len(self) -> int:
        """Positions of one KV cache slot: the longest prompt plus the most decode steps."""
        return self.input_seq_len + self.max_decode_steps

    def num_params(self) -> int:
        """Parameters of the model (a tied output projection counts once)."""
        return self.architecture().num_params()

    def memory_estimate(self) -> memory.MemoryEstimate:
        """The replica's memory figures (`servables.memory`): weights, KV cache of the largest
        batch at full slot length, the largest prefill's activations."""
        return memory.estimate_config(self)

    def weight_bytes(self) -> int:
        """Bytes of the weights in `dtype`; with quantization, as `servables.memory` counts them
        (int8: one byte a value plus a `dtype` scale per output row; int4: half a byte a value
        plus a bfloat16 scale and zero per group; the output projection as
        LM_HEAD_QUANTIZATION says)."""
        return self.memory_estimate().weight_bytes

    def kv_cache_bytes_per_token(self) -> int:
        """KV cache bytes of one position (keys and values of every layer, in `dtype`)."""
        return self.memory_estimate().kv_bytes_per_token

    def activation_bytes(self) -> int:
        """Working memory of the largest prefill: float32 logits and the MLP activations."""
        return self.memory_estimate().activation_bytes

    def memory_bytes(self) -> int:
        """Memory of one replica: the `ram` override, else weights + KV cache of the largest
        batch at full slot length + the largest prefill's activations."""
        if self.ram > 0:
            return self.ram
        return self.memory_estimate().total_bytes

    def validate(self) -> None:
        super().validate()
        self.architecture().validate()
        if self.max_queue <= 0:
            raise InvalidArgumentError(f"max_queue must be positive, got {self.max_queue}")
        if self.max_num_batched_tokens < 0:
            raise InvalidArgumentError(
                f"MAX_NUM_BATCHED_TOKENS must be 0 (no limit) or positive, got "
                f"{self.max_num_batched_tokens}"
            )
        if self.cpu_threads < 0:
            raise InvalidArgumentError(
                f"CPU_THREADS must be 0 (chosen while serving) or positive, got {self.cpu_threads}"
            )
        if self.cpu_gemm not in ("auto", "torch"):
            raise InvalidArgumentError(f'CPU_GEMM must be "auto" or "torch", got {self.cpu_gemm!r}')
        if self.kv_block_size <= 0 or self.kv_cache_tokens < 0:
            raise InvalidArgumentError(
                f"KV_BLOCK_SIZE must be positive and KV_CACHE_TOKENS 0 (every sequence at full "
                f"length) or positive, got {self.kv_block_size} and {self.kv_cache_tokens}"
            )
        if 0 < self.kv_cache_tokens < self.slot_len:
            raise InvalidArgumentError(
                f"KV_CACHE_TOKENS {self.kv_cache_tokens} does not hold one sequence of "
                f"INPUT_SEQ_LEN + MAX_DECODE_STEPS = {self.slot_len} positions; raise it"
            )
        if self.lm_head_quantization not in ("none", "int8", "int4"):
            raise InvalidArgumentError(
                f"LM_HEAD_QUANTIZATION must be none, int8 or int4: {self.lm_head_quantization}"
            )
        if "int4" in (self.quantization, self.head_quantization):
            self._check_group_size()
        max_seq_len = self.architecture().max_seq_len
        if self.slot_len > max_seq_len:
            raise InvalidArgumentError(
                f"INPUT_SEQ_LEN {self.input_seq_len} + MAX_DECODE_STEPS {self.max_decode_steps} "
                f"= {self.slot_len} exceeds the model's {max_seq_len} positions; lower one "
                "of them"
            )

    @property
    def head_quantization(self) -> str:
        """How the output projection is served: LM_HEAD_QUANTIZATION with QUANTIZATION int8 or
        int4, else "none"."""
        return "none" if self.quantization == "none" else self.lm_head_quantization

    def _check_group_size(self) -> None:
        """INVALID_ARGUMENT unless QUANTIZATION_GROUP_SIZE is one the int4 kernel takes and
        divides the input columns of every quantized weight."""
        group = self.quantization_group_size
        if group not in INT4_GROUP_SIZES:
            raise InvalidArgumentError(
                f"QUANTIZATION_GROUP_SIZE must be one of {list(INT4_GROUP_SIZES)}, got {group}"
            )
        arch = self.architecture()
        widths = {"model_dim": arch.model_dim, "hidden_dim": arch.hidden_dim}
        widths["num_heads x head_dim"] = arch.num_heads * arch.head_dim
        fitting = [g for g in INT4_GROUP_SIZES if not any(w % g for w in widths.values())]
        for name, width in widths.items():
            if width % group:
                hint = f"choose one of {fitting}" if fitting else 'use QUANTIZATION "int8"'
                raise InvalidArgumentError(
                    f"QUANTIZATION_GROUP_SIZE {group} does not divide {name} {width}; {hint}"
                )
