"""The torch BLOOM against transformers' BloomForCausalLM with the same random weights: real head
layouts (bloom-560m's 16 heads of 64, and 12 heads, whose ALiBi slopes are not all powers of
one base), few layers, a small vocabulary."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

from model_server.backends.torch.weights import build_model
from model_server.models.paged_torch import Chunk, DecodeRows
from sax.errors import FailedPreconditionError
from servables.configs.bloom import BloomConfig, alibi_slopes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TINY = BloomConfig(
    num_layers=2,
    num_heads=16,
    model_dim=1024,
    vocab_size=320,
    dtype="float32",
    batch_sizes=(1, 2, 4),
    input_seq_len=32,
    max_decode_steps=16,
)
CLOSE = functools.partial(torch.testing.assert_close, atol=1e-4, rtol=1e-4)


def hf_model(config: BloomConfig, seed: int = 0) -> torch.nn.Module:
    """transformers' BLOOM with random weights (and non-trivial norms and biases)."""
    torch.manual_seed(seed)
    hf_config = transformers.BloomConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.model_dim,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        layer_norm_epsilon=config.norm_eps,
        apply_residual_connection_post_layernorm=config.residual_post_norm,
    )
    model = transformers.BloomForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.1, 0.1)
            elif name.endswith("bias"):
                p.uniform_(-0.05, 0.05)
    return model


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()  # type: ignore[no-any-return]


@pytest.mark.parametrize("heads", [1, 8, 12, 16, 32, 112])
def test_alibi_slopes_are_bloom_s(heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 3)
    theirs = build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]  # position 1: the slope
    assert alibi_slopes(heads) == pytest.approx(theirs.tolist(), rel=1e-6)
    assert alibi_slopes(heads, heads=[heads - 1]) == pytest.approx([theirs[-1].item()])


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dataclasses.replace(TINY, num_heads=12, model_dim=768),
        dataclasses.replace(TINY, residual_post_norm=True),
    ],
    ids=["16-heads", "12-heads", "post-norm-residual"],
)
def test_forward_matches_transformers(config: BloomConfig) -> None:
    hf = hf_model(config)
    model = build_model(config, hf.state_dict().items())
    tokens = torch.randint(
        0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        CLOSE(model(tokens), hf_logits(hf, tokens))


def test_prefill_and_decode_match_transformers() -> None:
    hf = hf_model(TINY)
    model = build_model(TINY, hf.state_dict().items())
    tokens = torch.randint(0, TINY.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = hf_logits(hf, tokens)[0]  # [T, V]
    with torch.inference_mode():
        model.allocate_cache(num_blocks=12, block_size=8, max_len=TINY.slot_len)
        scattered, consecutive = (7, 2, 10, 4), (3, 4, 5, 6)
        for table in (scattered, consecutive):
            hidden = model.step(tokens[0, :16], [Chunk(table, 0, 16)])
            CLOSE(model.logits(hidden), ref[:16])
        for pos in range(16, 24):
            # Gathered from the scattered blocks, and attended in place in the consecutive ones.
            for table, first in ((scattered, None), (consecutive, 3)):
                rows = DecodeRows((table,), (pos,), span=32, first=first)
                hidden = model.step(tokens[0, pos : pos + 1], [rows])
                CLOSE(model.logits(hidden)[0], ref[pos])


def test_one_pass_mixes_prompt_chunks_and_decode_rows() -> None:
    """A step with a prompt's first chunk, another prompt's later chunk and decode rows of two
    sequences gives each token the logits of its own sequence run alone."""
    hf = hf_model(TINY)
    model = build_model(TINY, hf.state_dict().items())
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, TINY.vocab_size, (20,), generator=gen) for _ in range(4)]
    refs = [hf_logits(hf, s[None])[0] for s in seqs]
    with torch.inference_mode():
        model.allocate_cache(num_blocks=16, block_size=4, max_len=TINY.slot_len)
        tables = [(0, 5, 9, 13, 14), (1, 6, 10, 2), (3, 7), (15, 11, 12, 4, 8)]
        model.step(seqs[0][:12], [Chunk(tables[0], 0, 12)])
        model.step(seqs[1][:8], [Chunk(tables[1], 0, 8)])
        model.step(seqs[3][:15], [Chunk(tables[3], 0, 15)])
        parts = [
            Chunk(tables[2], 0, 6),
            Chunk(tables[1], 8, 5),
            DecodeRows((tables[0], tables[3]), (12, 15), span=32),
        ]
        tokens = torch.cat((seqs[2][:6], seqs[1][8:13], seqs[0][12:13], seqs[3][15:16]))
        logits = model.logits(model.step(tokens, parts))
        CLOSE(logits[:6], refs[2][:6])
        CLOSE(logits[6:11], refs[1][8:13])
        CLOSE(logits[11], refs[0][12])
        CLOSE(logits[12], refs[3][15])


def test_the_output_projection_is_the_embedding() -> None:
    model = build_model(TINY, hf_model(TINY).state_dict().items())
    assert model.lm_head.weight.data_ptr() == model.embedding().weight.data_ptr()


def test_int8_weights_stay_close_to_float() -> None:
    hf = hf_model(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    int8 = build_model(dataclasses.replace(TINY, quantization="int8"), hf.state_dict().items())
    with torch.inference_mode():
        ours = int8(tokens)[0]
    ref = hf_logits(hf, tokens)[0]
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()


def test_bad_checkpoints_are_refused_with_the_tensor_name() -> None:
    state = hf_model(TINY).state_dict()
    missing = {k: v for k, v in state.items() if "h.1.mlp.dense_4h_to_h.bias" not in k}
    with pytest.raises(
        FailedPreconditionError, match=r"transformer\.h\.1\.mlp\.dense_4h_to_h\.bias"
    ):
        build_model(TINY, missing.items())
    bad = dict(state)
    bad["transformer.h.0.self_attention.query_key_value.weight"] = torch.zeros(3, 3)
    with pytest.raises(FailedPreconditionError, match=r"query_key_value\.weight.*\[3, 3\]"):
        build_model(TINY, bad.items())
