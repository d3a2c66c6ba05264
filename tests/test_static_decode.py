"""Pieces of the CUDA decode path that a CPU can check: the batch buckets, the static buffers (grow-only, graphs
dropped with the cache they point at) and the prefill's mask-free causal attention."""

from __future__ import annotations

import torch

import nemotron_fast
from nemotron_fast.decode.static import batch_bucket, static_decode
from nemotron_fast.model.layers import CAUSAL


def test_batch_buckets_are_powers_of_two() -> None:
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


def test_buffers_grow_only_and_drop_the_graphs_of_the_old_cache(ckpt_factory) -> None:
    model = nemotron_fast.load(ckpt_factory(vlm=False, vocab="small", seed=5))
    sd = static_decode(model)
    assert static_decode(model) is sd
    small = sd.buffers(3, 100)
    assert small.bucket == 4 and small.cache.max_len == 256
    assert sd.buffers(4, 200) is small  # same bucket, fits
    sd.denoise_fn(small, 8, exclude_id=None, graphs=True)
    sd.commit_fn(small, 8, graphs=True)
    assert sd.captures == 2
    sd.denoise_fn(small, 8, exclude_id=None, graphs=True)
    assert sd.captures == 2
    big = sd.buffers(4, 300)
    assert big is not small and big.cache.max_len == 512
    sd.denoise_fn(big, 8, exclude_id=None, graphs=True)
    assert sd.captures == 3, "the old cache's graph must not be reused"
    assert sd.buffers(1, 10).bucket == 1
    sd.release()
    assert sd.buffers(4, 10) is not big


def test_the_causal_flag_equals_the_lower_triangular_mask(ckpt_factory) -> None:
    """The unpadded CUDA prefill passes ``is_causal`` instead of a mask: the same attention."""
    model = nemotron_fast.load(ckpt_factory(vlm=False, vocab="small", seed=5))
    attn = model.encoder.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, model.config.text.hidden_size, generator=g)
    rope = model.rotary(torch.arange(9)[None].expand(2, 9), x.dtype)
    tril = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(attn(x, rope, CAUSAL), attn(x, rope, tril), rtol=1e-6, atol=1e-6)
