"""The sampler's steps on issue 6's Tekken-vocab VLM (``tekken-h64``, one-image prompt): one denoise step, one
commit and a whole ``generate``, fast path against the reference (upstream's computation on the transformers
twin). Every round works on a cache holding exactly the prompt, so rounds are independent."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nemotron_fast import reference
from nemotron_fast.generate import _pad_prompts, commit, denoise_step, prefill
from nemotron_fast.sampling import SamplingPolicy

from .measure import fast_generate

L = 32


def _fast_state(loaded: Any) -> tuple[Any, Any, torch.Tensor, int]:
    """Prefilled fast-path cache, the first block ([1, L]: seed + masks) and its cache slot."""
    model = loaded.model
    ids, pad = _pad_prompts(model, loaded.ids)
    feats = model.image_features(loaded.pixel_values, loaded.image_sizes)
    cache, last = prefill(model, ids, pad, L, feats)
    x = torch.full((1, L), model.config.mask_token_id, dtype=torch.long)
    x[:, 0] = last.argmax(-1)
    return model, cache, x, ids.shape[1]


def _ref_state(loaded: Any) -> tuple[Any, Any, torch.Tensor, int]:
    """Prefilled reference twin cache and the first block."""
    twin = loaded.twin
    cache = twin.new_cache()
    logits = twin.causal_forward(twin.embed(loaded.ids, loaded.pixel_values, loaded.image_sizes), cache)
    block = torch.full((1, L), twin.config.mask_token_id, dtype=torch.long)
    block[:, 0] = logits[:, -1].argmax(-1)
    return twin, cache, block, cache.get_seq_length()


@pytest.mark.parametrize("impl", ["fast", "reference"])
@torch.inference_mode()
def test_denoise_step(benchmark, impl: str, tekken_vlm: Any) -> None:
    """One diffusion forward of a fully masked block + proposal (head, confidence, argmax)."""
    benchmark.group = "denoise step (tekken-h64, block 32)"
    if impl == "fast":
        model, cache, block, start = _fast_state(tekken_vlm)
        x0, _ = benchmark(denoise_step, model, cache, block, start, temperature=0.0, noise=None, exclude_id=None)
    else:
        twin, cache, block, _ = _ref_state(tekken_vlm)
        mask_id = twin.config.mask_token_id
        x0, _ = benchmark(lambda: reference.propose(twin.diffusion_forward(twin.embed(block), cache), block, mask_id))
    assert x0.shape == (1, L)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@torch.inference_mode()
def test_commit(benchmark, impl: str, tekken_vlm: Any) -> None:
    """The causal forward over a finished block that writes its K/V, plus the next seed."""
    benchmark.group = "commit (tekken-h64, block 32)"
    if impl == "fast":
        model, cache, block, start = _fast_state(tekken_vlm)
        block[:, 1:] = 1000
        seed = benchmark(lambda: commit(model, cache, block, start).argmax(-1))
    else:
        twin, cache, block, past = _ref_state(tekken_vlm)
        block[:, 1:] = 1000

        def step() -> torch.Tensor:
            logits = twin.causal_forward(twin.embed(block), cache)
            cache.crop(-(cache.get_seq_length() - past))  # back to the prompt: every round commits the same block
            return reference.pick_next(logits[:, -1], 0.0)

        seed = benchmark(step)
    assert seed.shape == (1,)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_generate(benchmark, impl: str, tekken_vlm: Any) -> None:
    """A whole call: vision, prefill, one block of 32 tokens at threshold 0.9 (endpoint defaults otherwise)."""
    benchmark.group = "generate (tekken-h64, 32 tokens)"
    fn = fast_generate if impl == "fast" else reference.generate
    t = tekken_vlm
    res = benchmark.pedantic(fn, args=(t.model, t.ids, t.pixel_values, t.image_sizes),
                             kwargs=dict(max_new_tokens=L, steps=L, block_length=L, threshold=0.9,
                                         policy=SamplingPolicy()), rounds=3, warmup_rounds=1)
    assert len(res.completion_ids[0]) == L
