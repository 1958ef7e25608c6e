"""The torch Llama against transformers' LlamaForCausalLM with the same random weights."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import pytest
import torch

from model_server.backends.torch.weights import build_model, load_weights, place
from model_server.models.llama_torch import LlamaForCausalLM
from model_server.models.paged_torch import Chunk, DecodeRows
from sax.errors import FailedPreconditionError
from servables.configs.llama import LlamaConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TINY = LlamaConfig(
    num_layers=3,
    num_heads=8,
    num_kv_heads=2,
    model_dim=64,
    hidden_dim=96,
    vocab_size=257,
    rope_theta=5000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
    max_seq_len=256,
    dtype="float32",
    batch_sizes=(1, 2, 4),
    bucket_keys=(8, 16),
    input_seq_len=32,
    max_decode_steps=16,
)


def hf_model(config: LlamaConfig, seed: int = 0) -> torch.nn.Module:
    """transformers' Llama with random weights, for the same architecture."""
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.model_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_seq_len,
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missed norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dataclasses.replace(TINY, tie_embeddings=True),
        dataclasses.replace(TINY, num_kv_heads=8),  # multi-head attention
        dataclasses.replace(TINY, num_kv_heads=1),  # multi-query attention
    ],
    ids=["gqa-untied", "gqa-tied", "mha", "mqa"],
)
def test_forward_matches_transformers(config: LlamaConfig) -> None:
    hf = hf_model(config)
    model = build_model(config, hf.state_dict().items())
    tokens = torch.randint(
        0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


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
            torch.testing.assert_close(model.logits(hidden), ref[:16], atol=1e-5, rtol=1e-5)
        for pos in range(16, 24):
            # Gathered from the scattered blocks, and attended in place in the consecutive ones.
            for table, first in ((scattered, None), (consecutive, 3)):
                rows = DecodeRows((table,), (pos,), span=32, first=first)
                hidden = model.step(tokens[0, pos : pos + 1], [rows])
                logits = model.logits(hidden)[0]
                torch.testing.assert_close(logits, ref[pos], atol=1e-5, rtol=1e-5)


def test_one_pass_mixes_prompt_chunks_and_decode_rows() -> None:
    """A step with a prompt's first chunk, another prompt's later chunk and decode rows of two
    sequences gives each token the logits of its own sequence run alone."""
    hf = hf_model(TINY)
    model = build_model(TINY, hf.state_dict().items())
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, TINY.vocab_size, (20,), generator=gen) for _ in range(4)]
    refs = [hf_logits(hf, s[None])[0] for s in seqs]  # [20, V] each
    with torch.inference_mode():
        model.allocate_cache(num_blocks=16, block_size=4, max_len=TINY.slot_len)
        tables = [(0, 5, 9, 13, 14), (1, 6, 10, 2), (3, 7), (15, 11, 12, 4, 8)]
        # Sequences 0, 1, 3 hold 12, 8 and 15 positions already.
        model.step(seqs[0][:12], [Chunk(tables[0], 0, 12)])
        model.step(seqs[1][:8], [Chunk(tables[1], 0, 8)])
        model.step(seqs[3][:15], [Chunk(tables[3], 0, 15)])
        parts = [
            Chunk(tables[2], 0, 6),  # sequence 2's first chunk
            Chunk(tables[1], 8, 5),  # sequence 1's next chunk, attending to its cached 8
            DecodeRows((tables[0], tables[3]), (12, 15), span=32),  # one token each
        ]
        tokens = torch.cat((seqs[2][:6], seqs[1][8:13], seqs[0][12:13], seqs[3][15:16]))
        logits = model.logits(model.step(tokens, parts))  # [13, V]
        close = functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
        close(logits[:6], refs[2][:6])
        close(logits[6:11], refs[1][8:13])
        close(logits[11], refs[0][12])
        close(logits[12], refs[3][15])


def test_tied_output_projection_shares_the_embedding() -> None:
    config = dataclasses.replace(TINY, tie_embeddings=True)
    state = hf_model(config).state_dict()
    state.pop("lm_head.weight", None)
    model = build_model(config, state.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _stream(state: dict[str, torch.Tensor], seen: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in state.items():
        seen.append(name)
        yield name, tensor


def test_weights_are_placed_as_they_stream_without_copies() -> None:
    state = {k: v.clone() for k, v in hf_model(TINY).state_dict().items()}
    seen: list[str] = []
    with torch.device("meta"):
        model = LlamaForCausalLM(TINY.architecture())
    place(model, [torch.device("cpu")])
    load_weights(model, _stream(state, seen), torch.float32)  # before fusing and packing
    assert seen == list(state)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    # Same device and dtype: the streamed tensor itself becomes the parameter.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert model.get_parameter(q).data_ptr() == state[q].data_ptr()


def test_weights_are_cast_to_the_config_dtype() -> None:
    config = dataclasses.replace(TINY, dtype="bfloat16")
    hf = hf_model(config)
    model = build_model(config, hf.state_dict().items())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(
        0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3)
    )
    with torch.inference_mode():
        ours = model(tokens)
    assert ours.dtype == torch.float32
    # bfloat16 weights: close to the float32 reference, not equal.
    assert (ours - hf_logits(hf, tokens)).abs().max() < 0.1


def test_bad_checkpoints_are_refused_with_the_tensor_name() -> None:
    state = hf_model(TINY).state_dict()
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(FailedPreconditionError, match=r"lacks 1 tensors.*model\.norm\.weight"):
        build_model(TINY, missing.items())
    extra = {**state, "model.layers.9.mlp.up_proj.weight": state["model.norm.weight"]}
    with pytest.raises(FailedPreconditionError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        build_model(TINY, extra.items())
    small = dataclasses.replace(TINY, hidden_dim=32)
    with pytest.raises(FailedPreconditionError, match=r"gate_proj.weight.*shape \[96, 64\]"):
        build_model(small, state.items())
    fp8 = dataclasses.replace(TINY, quantization="fp8")
    with pytest.raises(FailedPreconditionError, match="QUANTIZATION"):
        build_model(fp8, state.items())


def test_rotary_inv_freq_buffers_are_ignored() -> None:
    state = dict(hf_model(TINY).state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    assert isinstance(build_model(TINY, state.items()), LlamaForCausalLM)


def test_layers_split_over_devices_in_contiguous_groups() -> None:
    model = build_model(TINY, hf_model(TINY).state_dict().items())
    place(model, [torch.device("cuda", i) for i in range(2)])  # placement arithmetic only
    assert [d.index for d in model.layer_devices] == [0, 0, 1]
    assert model.param_device("model.embed_tokens.weight").index == 0
    assert model.param_device("model.layers.2.mlp.up_proj.weight").index == 1
    assert model.param_device("model.norm.weight").index == 1
    assert model.param_device("lm_head.weight").index == 1
