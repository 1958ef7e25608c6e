"""The torch runner: prefill/decode over the KV cache against cache-free causal passes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from model_server.backends.torch.torch_runner import TorchRunner, build_runner
from model_server.backends.torch.weights import resolve_dtype
from model_server.engine.request import SampleOptions
from model_server.engine.scheduler import BlockCopy, DecodeBatch, PrefillWork, SchedulerOutput
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.configs.llama import LlamaConfig

CONFIG = LlamaConfig(
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    model_dim=32,
    hidden_dim=64,
    vocab_size=101,
    rope_theta=10000.0,
    tie_embeddings=True,
    max_seq_len=512,
    dtype="float32",
    batch_sizes=(1, 2, 4),
    bucket_keys=(8, 16),
    input_seq_len=24,
    max_decode_steps=76,  # slot length 100: decode spans 32, 64, 96 and 100
)
ATOL = 1e-5


def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical-name weights with random values (std ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    d, f, hd = config.model_dim, config.hidden_dim, config.head_dim

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    state = {"model.embed_tokens.weight": torch.randn(config.vocab_size, d, generator=g)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        state[p + "self_attn.q_proj.weight"] = w(config.num_heads * hd, d)
        state[p + "self_attn.k_proj.weight"] = w(config.num_kv_heads * hd, d)
        state[p + "self_attn.v_proj.weight"] = w(config.num_kv_heads * hd, d)
        state[p + "self_attn.o_proj.weight"] = w(d, config.num_heads * hd)
        state[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        state[p + "mlp.gate_proj.weight"] = w(f, d)
        state[p + "mlp.up_proj.weight"] = w(f, d)
        state[p + "mlp.down_proj.weight"] = w(d, f)
    state["model.norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    if not config.tie_embeddings:
        state["lm_head.weight"] = w(config.vocab_size, d)
    return state


@pytest.fixture(scope="module")
def runner() -> TorchRunner:
    return build_runner(CONFIG, random_weights(CONFIG).items(), num_slots=5)


def tokens_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist()


def full_forward(runner: TorchRunner, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of a cache-free causal pass over tokens."""
    model = runner._live()
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


def test_shapes_and_padding_tables(runner: TorchRunner) -> None:
    assert (runner.num_slots, runner.max_seq_len, runner.vocab_size) == (5, 100, 101)
    assert runner.buckets == (8, 16, 100)  # BUCKET_KEYS, then the slot length
    assert runner.spans == (32, 64, 96, 100)
    assert runner.bucket(1) == 8 and runner.bucket(9) == 16 and runner.bucket(17) == 100


def test_prefill_then_decode_equals_a_full_causal_pass(runner: TorchRunner) -> None:
    tokens = tokens_of(80, seed=1)  # decode crosses the 64-position span
    ref = full_forward(runner, tokens)
    logits = torch.from_numpy(runner.prefill_logits(2, tokens[:11]))
    assert logits.shape == (11, CONFIG.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref[:11], atol=ATOL, rtol=ATOL)
    last = torch.from_numpy(runner.prefill_logits(3, tokens[:11], all_logits=False))
    torch.testing.assert_close(last, ref[10:11], atol=ATOL, rtol=ATOL)
    for pos in range(11, 80):
        step = torch.from_numpy(runner.decode_logits([2], [tokens[pos]], [pos]))
        torch.testing.assert_close(step[0], ref[pos], atol=ATOL, rtol=ATOL)


def test_decode_of_several_slots_at_different_positions(runner: TorchRunner) -> None:
    prompts = {0: tokens_of(5, 10), 1: tokens_of(16, 11), 3: tokens_of(9, 12)}
    continuations = {slot: tokens_of(6, 20 + slot) for slot in prompts}
    for slot, prompt in prompts.items():
        torch.from_numpy(runner.prefill_logits(slot, prompt))
    for step in range(6):
        slots = [3, 0, 1]  # any order; 3 rows padded to a batch of 4
        toks = [continuations[s][step] for s in slots]
        positions = [len(prompts[s]) + step for s in slots]
        logits = torch.from_numpy(runner.decode_logits(slots, toks, positions))
        assert logits.shape == (3, CONFIG.vocab_size)
        for row, slot in enumerate(slots):
            seq = prompts[slot] + continuations[slot][: step + 1]
            ref = full_forward(runner, seq)[-1]
            torch.testing.assert_close(logits[row], ref, atol=ATOL, rtol=ATOL)


def test_longer_prefills_and_larger_batches_agree(runner: TorchRunner) -> None:
    prompt = tokens_of(7, seed=3)
    a = torch.from_numpy(runner.prefill_logits(0, prompt))  # bucket 8
    b = torch.from_numpy(runner.prefill_logits(1, prompt + tokens_of(10, seed=4)))[:7]  # bucket 100
    torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)
    # One row alone (batch 1) and the same row among others (batch 4) agree.
    torch.from_numpy(runner.prefill_logits(4, prompt))
    alone = torch.from_numpy(runner.decode_logits([0], [5], [7]))
    torch.from_numpy(runner.prefill_logits(0, prompt))
    together = torch.from_numpy(runner.decode_logits([4, 0, 1], [6, 5, 9], [7, 7, 7]))
    torch.testing.assert_close(alone[0], together[1], atol=ATOL, rtol=ATOL)


def test_more_rows_than_the_largest_batch_run_in_chunks() -> None:
    config = dataclasses.replace(CONFIG, batch_sizes=(2,))
    small = build_runner(config, random_weights(config).items(), num_slots=5)
    prompts = [tokens_of(3 + s, 30 + s) for s in range(5)]
    for slot, prompt in enumerate(prompts):
        torch.from_numpy(small.prefill_logits(slot, prompt))
    logits = torch.from_numpy(
        small.decode_logits(list(range(5)), [1] * 5, [len(p) for p in prompts])
    )
    assert logits.shape == (5, CONFIG.vocab_size)
    for slot, prompt in enumerate(prompts):
        ref = full_forward(small, [*prompt, 1])[-1]
        torch.testing.assert_close(logits[slot], ref, atol=ATOL, rtol=ATOL)
    small.close()


def test_copy_slot_then_diverge(runner: TorchRunner) -> None:
    prompt = tokens_of(12, seed=5)
    first = torch.from_numpy(runner.prefill_logits(1, prompt))
    torch.from_numpy(
        runner.prefill_logits(2, tokens_of(12, seed=6))
    )  # something else in the destination
    runner.copy_slot(1, 2, len(prompt))
    logits = torch.from_numpy(runner.decode_logits([1, 2], [7, 8], [12, 12]))
    torch.testing.assert_close(logits[0], full_forward(runner, [*prompt, 7])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], full_forward(runner, [*prompt, 8])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[-1], full_forward(runner, prompt)[-1], atol=ATOL, rtol=ATOL)


def test_too_long_and_bad_inputs_are_refused(runner: TorchRunner) -> None:
    with pytest.raises(InvalidArgumentError, match="101 tokens, more than the 100 positions"):
        torch.from_numpy(runner.prefill_logits(0, [1] * 101))
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        torch.from_numpy(runner.prefill_logits(0, []))
    with pytest.raises(InvalidArgumentError, match="slot 5"):
        torch.from_numpy(runner.prefill_logits(5, [1]))
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        torch.from_numpy(runner.prefill_logits(0, [101]))
    with pytest.raises(InvalidArgumentError, match="distinct"):
        torch.from_numpy(runner.decode_logits([1, 1], [1, 2], [3, 4]))
    with pytest.raises(InvalidArgumentError, match="positions"):
        torch.from_numpy(runner.decode_logits([1], [1], [100]))
    with pytest.raises(InvalidArgumentError, match="as many"):
        torch.from_numpy(runner.decode_logits([1, 2], [1], [3, 4]))
    with pytest.raises(InvalidArgumentError, match="copy length"):
        runner.copy_slot(0, 1, 101)


def test_default_slots_and_close() -> None:
    closing = build_runner(CONFIG, random_weights(CONFIG).items())
    assert closing.num_slots == max(CONFIG.batch_sizes)
    torch.from_numpy(closing.prefill_logits(0, [1, 2, 3]))
    closing.close()
    closing.close()  # idempotent
    with pytest.raises(FailedPreconditionError, match="closed"):
        torch.from_numpy(closing.decode_logits([0], [1], [3]))


def test_mesh_larger_than_the_gpus_is_refused() -> None:
    config = dataclasses.replace(CONFIG, ici_mesh_shape=(1, 1, 64))
    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    with pytest.raises(FailedPreconditionError, match="needs 64 GPUs"):
        build_runner(config, random_weights(config).items(), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(runner: TorchRunner) -> None:
    gpu = build_runner(CONFIG, random_weights(CONFIG).items(), device="cuda", num_slots=5)
    prompt = tokens_of(13, seed=7)
    torch.testing.assert_close(
        torch.from_numpy(gpu.prefill_logits(0, prompt)),
        torch.from_numpy(runner.prefill_logits(0, prompt)),
        atol=1e-4,
        rtol=1e-4,
    )
    a = torch.from_numpy(gpu.decode_logits([0], [3], [13]))
    b = torch.from_numpy(runner.decode_logits([0], [3], [13]))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    gpu.close()


PAGED = dataclasses.replace(CONFIG, kv_block_size=4, kv_cache_tokens=160)  # 40 blocks


@pytest.fixture(scope="module")
def paged() -> TorchRunner:
    return build_runner(PAGED, random_weights(PAGED).items(), num_slots=4)


def test_a_step_runs_chunks_whole_prompts_and_decodes_in_one_pass(paged: TorchRunner) -> None:
    """step_logits of mixed work over scattered block tables equals each sequence's
    cache-free pass: a prompt split over two steps, a whole prompt with two samples (sharing
    its full block, the partial one copied), and decode rows beside them."""
    a, b, c = tokens_of(11, 40), tokens_of(6, 41), tokens_of(9, 42)
    paged.prefill_blocks((11, 12, 13), c[:8], all_logits=False)
    one = (SampleOptions(),)
    first = SchedulerOutput(
        step=1,
        prefills=(
            PrefillWork(1, tuple(a), (30, 3, 17), one, start=0, stop=5, block_size=4),
            PrefillWork(2, tuple(b), (5, 9), one * 2, forks=((5, 20),), block_size=4),
        ),
        decodes=(DecodeBatch(((3, 0),), ((11, 12, 13),), (c[8],), (8,)),),
    )
    assert first.prefills[1].copies == (BlockCopy(9, 20, 2),)
    rows = torch.from_numpy(paged.step_logits(first))  # b's two samples, then c's row
    assert rows.shape == (3, CONFIG.vocab_size)
    torch.testing.assert_close(rows[0], full_forward(paged, b)[-1], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(rows[1], rows[0])
    torch.testing.assert_close(rows[2], full_forward(paged, c)[-1], atol=ATOL, rtol=ATOL)
    second = SchedulerOutput(
        step=2,
        prefills=(PrefillWork(1, tuple(a), (30, 3, 17), one, start=5, block_size=4),),
        decodes=(DecodeBatch(((2, 0), (2, 1)), ((5, 9), (5, 20)), (7, 8), (6, 6)),),
    )
    rows = torch.from_numpy(paged.step_logits(second))
    torch.testing.assert_close(rows[0], full_forward(paged, a)[-1], atol=ATOL, rtol=ATOL)
    for row, token in ((1, 7), (2, 8)):  # the copied block diverges from the first
        ref = full_forward(paged, [*b, token])[-1]
        torch.testing.assert_close(rows[row], ref, atol=ATOL, rtol=ATOL)


def test_block_tables_are_checked(paged: TorchRunner) -> None:
    with pytest.raises(InvalidArgumentError, match="holds 8 positions, not 9"):
        paged.prefill_blocks((1, 2), tokens_of(9, 1), all_logits=False)
    with pytest.raises(InvalidArgumentError, match=r"outside \[0, 40\)"):
        paged.prefill_blocks((1, 40), tokens_of(5, 1), all_logits=False)
    # Slot calls need every slot at full length: 4 slots of 25 blocks do not fit in 40.
    with pytest.raises(FailedPreconditionError, match="KV_CACHE_TOKENS"):
        paged.prefill_logits(3, tokens_of(5, 1))


def test_dtype_auto_follows_the_cpu() -> None:
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_dtype("auto", torch.device("cpu")) == ("bfloat16" if bf16 else "float32")
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    config = dataclasses.replace(CONFIG, dtype="auto")
    config.validate()
    auto = build_runner(config, random_weights(config).items(), num_slots=1)
    expected = torch.bfloat16 if bf16 else torch.float32
    assert auto._live().lm_head.weight.dtype == expected
    assert auto.prefill_logits(0, tokens_of(5, 1)).dtype == np.float32
    auto.close()


def test_decode_rows_attend_in_place_when_their_blocks_follow_each_other(
    paged: TorchRunner,
) -> None:
    spaced = paged._evenly_spaced
    assert spaced([(4, 5, 6)], 12) == (4, 0)
    assert spaced([(4, 5, 6), (10, 11)], 12) == (4, 6)
    assert spaced([(4, 5, 6), (10, 12)], 12) == (None, 0)  # a gap in the second table
    assert spaced([(4, 5), (10, 11), (15, 16)], 8) == (None, 0)  # uneven spacing
    assert spaced([(38, 39)], 12) == (None, 0)  # the view would pass the last block
    # Both ways give the logits of the cache-free pass.
    seq = tokens_of(9, 50)
    for table in ((20, 21, 22), (22, 20, 21)):
        paged.prefill_blocks(table, seq[:8], all_logits=False)
        step = SchedulerOutput(step=1, decodes=(DecodeBatch(((1, 0),), (table,), (seq[8],), (8,)),))
        row = torch.from_numpy(paged.step_logits(step))[0]
        torch.testing.assert_close(row, full_forward(paged, seq)[-1], atol=ATOL, rtol=ATOL)
