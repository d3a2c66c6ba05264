"""Each kernel's CPU path (the dispatcher ``<op>``), its ``<op>_ref`` twin and, where there is one, the upstream
computation it replaces, on the shapes of a Tekken-vocab decode step. On a CPU the dispatcher runs the twin, so
the first two rows agree; the third shows what the fused op saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemotron_fast import reference
from nemotron_fast.kernels import (
    block_attention,
    block_attention_ref,
    confidence_argmax,
    confidence_argmax_ref,
    head_confidence_argmax,
    head_confidence_argmax_ref,
    select_unmask,
    select_unmask_ref,
)

from .conftest import TEKKEN_VOCAB


def _unfused_head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream: full logits, softmax over the vocabulary, argmax and gather."""
    logits = F.linear(hidden, weight)
    x0 = logits.argmax(-1)
    return x0, F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("impl", ["cpu_path", "ref", "upstream_unfused"])
def test_head_confidence(benchmark, impl: str, rows: int, gen: torch.Generator) -> None:
    """Output head fused with confidence/argmax: ``rows`` masked positions, hidden 64, Tekken vocabulary."""
    benchmark.group = f"head_confidence rows={rows}"
    weight = torch.randn(TEKKEN_VOCAB, 64, generator=gen) / 8
    hidden = torch.randn(rows, 64, generator=gen)
    fn = {"cpu_path": head_confidence_argmax, "ref": head_confidence_argmax_ref,
          "upstream_unfused": _unfused_head}[impl]
    x0, conf = benchmark(fn, hidden, weight)
    assert x0.shape == (rows,) and conf.shape == (rows,)


@pytest.mark.parametrize("impl", ["cpu_path", "ref", "upstream_propose"])
def test_confidence_argmax(benchmark, impl: str, gen: torch.Generator) -> None:
    """Confidence/argmax over a block's logits [1, 32, 131072]."""
    benchmark.group = "confidence_argmax [1, 32, V]"
    logits = torch.randn(1, 32, TEKKEN_VOCAB, generator=gen)
    if impl == "upstream_propose":
        block = torch.full((1, 32), 100)
        benchmark(reference.propose, logits, block, 100)
        return
    fn = confidence_argmax if impl == "cpu_path" else confidence_argmax_ref
    x0, _ = benchmark(fn, logits)
    assert x0.shape == (1, 32)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("impl", ["cpu_path", "ref", "upstream_loop"])
def test_select_unmask(benchmark, impl: str, batch: int, gen: torch.Generator) -> None:
    """Threshold reveal over a [batch, 32] block (in place: every round works on fresh copies)."""
    benchmark.group = f"select_unmask batch={batch}"
    conf = torch.rand(batch, 32, generator=gen)
    x0 = torch.randint(1000, 2000, (batch, 32), generator=gen)
    block0 = torch.full((batch, 32), 100)
    block0[:, 0] = 5
    if impl == "upstream_loop":
        benchmark(reference.select_threshold, conf, block0 == 100, 0.9)
        return
    fn = select_unmask if impl == "cpu_path" else select_unmask_ref

    def step() -> torch.Tensor:
        block = block0.clone()
        return fn(x0, conf, block, block == 100, threshold=0.9)

    assert benchmark(step).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["cpu_path", "ref"])
def test_block_attention(benchmark, impl: str, causal: bool, gen: torch.Generator) -> None:
    """One layer's block attention (cache write + attention over the prefix and the 32-token block): 4 query
    heads on 2 kv-heads, D 16, a [1, 2, 1600, 16] cache with the block at slot 1066."""
    benchmark.group = f"block_attention causal={causal}"
    k_cache, v_cache = torch.zeros(2, 1, 2, 1600, 16).unbind(0)
    q = torch.randn(1, 4, 32, 16, generator=gen)
    k_new, v_new = torch.randn(2, 1, 2, 32, 16, generator=gen).unbind(0)
    start, pad = torch.tensor([1066]), torch.tensor([0])
    fn = block_attention if impl == "cpu_path" else block_attention_ref
    out = benchmark(fn, q, k_cache, v_cache, k_new, v_new, start, pad, causal=causal)
    assert out.shape == q.shape and torch.equal(k_cache[:, :, 1066:1098], k_new)
