"""The float32 kernel for few rows (CPU_GEMM=auto): built and cached, products equal to
torch's, the choice of row counts, its place in the model, and runners that agree with and
without it."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional

from model_server.backends.torch import small_gemm
from model_server.backends.torch.torch_runner import build_runner
from sax.errors import InvalidArgumentError
from tests.model_server.backends.torch.test_torch_runner import CONFIG, random_weights, tokens_of

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture
def kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh kernel cache, and `load` forgetting what it loaded before and after."""
    monkeypatch.setenv("SAX_KERNEL_CACHE", str(tmp_path / "kernels"))
    small_gemm.load.cache_clear()
    yield tmp_path / "kernels"
    small_gemm.load.cache_clear()


@pytest.fixture(scope="module")
def gemm() -> small_gemm.SmallGemm:
    found = small_gemm.load()
    if found is None:
        pytest.skip("no C compiler")
    return found


@needs_compiler
def test_the_kernel_is_built_once_and_cached(kernel_cache: Path) -> None:
    first = small_gemm.load()
    assert first is not None and first.vector_width in (8, 16)
    built = list(kernel_cache.glob("small_gemm-*.so"))
    assert len(built) == 1 and not list(kernel_cache.glob("*.part"))
    stamp = built[0].stat().st_mtime_ns
    small_gemm.load.cache_clear()
    assert small_gemm.load() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_compiler_products_stay_on_torch(
    kernel_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(kernel_cache / "no-such-compiler"))
    assert small_gemm.load() is None
    assert not list(kernel_cache.glob("*.so"))


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 960, 576), (3, 33, 17), (5, 1000, 64), (16, 64, 1536), (70, 129, 100), (2, 7, 8)],
)
def test_products_equal_torchs(gemm: small_gemm.SmallGemm, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    torch.testing.assert_close(gemm(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)
    # Rows of x further apart than K (a slice of a wider tensor).
    wide = torch.randn(m, k + 5, generator=g)
    torch.testing.assert_close(gemm(wide[:, :k], w), wide[:, :k] @ w.t(), rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused(gemm: small_gemm.SmallGemm) -> None:
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        gemm(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        gemm(torch.randn(8, 2).t(), torch.randn(4, 8))


def test_a_weight_serves_few_rows_itself_and_more_through_torch(
    gemm: small_gemm.SmallGemm,
) -> None:
    w = torch.randn(40, 24)
    served = small_gemm.SmallRowsWeight(w, gemm, max_rows=4)
    few = torch.randn(1, 3, 24)  # [B, T, K]: 3 rows
    torch.testing.assert_close(served.linear(few), functional.linear(few, w))
    assert served.linear(few).shape == (1, 3, 40)
    many = torch.randn(2, 5, 24)
    assert torch.equal(served.linear(many), functional.linear(many, w))  # torch's own
    with pytest.raises(ValueError, match="float32 CPU"):
        small_gemm.SmallRowsWeight(w.bfloat16(), gemm, 4)


class _Instant:
    """A stand-in kernel that does no work: faster than torch at every size."""

    vector_width = 8

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x


class _Slow:
    """A stand-in kernel far slower than torch on a small weight."""

    vector_width = 8

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x


def test_the_choice_stops_at_the_first_count_where_torch_is_as_fast() -> None:
    weights = [torch.randn(64, 32) for _ in range(2)]
    rows = (1, 2, 4)
    assert small_gemm.choose_max_rows(_Instant(), weights, rows) == 4  # type: ignore[arg-type]
    assert small_gemm.choose_max_rows(_Slow(), weights, rows) == 0  # type: ignore[arg-type]


def test_the_probe_streams_a_bounded_share_of_the_weights() -> None:
    weights = [torch.zeros(256, 256) for _ in range(10)]  # 256 KiB each
    assert len(small_gemm.probe_weights(weights, limit=3 << 18)) == 3
    assert len(small_gemm.probe_weights(weights, limit=1)) == 1


@needs_compiler
def test_a_runner_with_the_kernel_agrees_with_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(small_gemm, "choose_max_rows", lambda gemm, weights: 8)
    ours = build_runner(CONFIG, random_weights(CONFIG).items(), num_slots=2)
    plain_config = dataclasses.replace(CONFIG, cpu_gemm="torch")
    plain = build_runner(plain_config, random_weights(CONFIG).items(), num_slots=2)
    prompt = tokens_of(12, 3)
    a = ours.prefill_logits(0, prompt)  # 12 rows: torch's product
    b = plain.prefill_logits(0, prompt)
    model = ours._live()
    layer = model.decoder_layers[0]
    served = (layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down)
    assert all(isinstance(w, small_gemm.SmallRowsWeight) for w in served)
    assert isinstance(model.head, small_gemm.SmallRowsWeight)
    assert plain._live().head is None
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Decode rows (1 and 2 at a time) run through the kernel; greedy tokens follow the same path.
    for step in range(6):
        pos = len(prompt) + step
        nxt = [int(np.argmax(a[-1]))] * 2
        a = ours.decode_logits([0, 1], nxt, [pos, step])  # slot 1: a sequence of its own
        b = plain.decode_logits([0, 1], nxt, [pos, step])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        assert (a.argmax(-1) == b.argmax(-1)).all()
    ours.close()
    plain.close()


def test_cpu_gemm_must_be_auto_or_torch() -> None:
    with pytest.raises(InvalidArgumentError, match="CPU_GEMM"):
        dataclasses.replace(CONFIG, cpu_gemm="mkl").validate()
