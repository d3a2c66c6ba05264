"""Our model against transformers' own classes (the twin): prefill, a diffusion step against the cache, the
commit, and a diffusion step after the commit. fp32: every argmax equal and max |diff| <= 1e-4.

bf16 policy (the flash-attention bar): both implementations run in bf16 and are compared against the fp32
twin; our error may be at most 2x the twin's own bf16 error (plus one bf16 ulp of the logit scale), because
bf16 rounding of each op dominates and a different but valid op order moves results by about that much.
"""

from __future__ import annotations

import pytest
import torch

from nemotron_fast.hf_twin import load_twin
from nemotron_fast.model import load

from .helpers import text_ids, vlm_prompt

FP32_ATOL = 1e-4


def _prompt(cfg, seed: int, vlm: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """An odd-length prompt; for the VLM two images (different sizes) in the real marker layout."""
    if not vlm:
        return text_ids(cfg, 37, torch.Generator().manual_seed(seed)).view(1, -1), None, None
    return vlm_prompt(cfg, seed)


def _run_ours(model, ids, pix, sizes, block):
    p, length = ids.shape[1], block.shape[1]
    cache = model.new_cache(1, p + 2 * length)
    emb = model.embed(ids, pix.to(model.dtype) if pix is not None else None, sizes)
    out = [model.head(model.forward_hidden(emb, cache=cache, start=0))]
    out.append(model.head(model.forward_hidden(model.embed(block), cache=cache, start=p, mode="diffusion")))
    out.append(model.head(model.forward_hidden(model.embed(block), cache=cache, start=p)))
    nxt = block.roll(1, dims=1)
    out.append(model.head(model.forward_hidden(model.embed(nxt), cache=cache, start=p + length, mode="diffusion")))
    return [o.float() for o in out]


def _run_twin(twin, ids, pix, sizes, block):
    cache = twin.new_cache()
    out = [twin.causal_forward(twin.embed(ids, pix, sizes), cache)]
    out.append(twin.diffusion_forward(twin.embed(block), cache))
    out.append(twin.causal_forward(twin.embed(block), cache))
    out.append(twin.diffusion_forward(twin.embed(block.roll(1, dims=1)), cache))
    return [o.float() for o in out]


def _block(cfg, length: int = 32) -> torch.Tensor:
    b = torch.full((1, length), cfg.mask_token_id)
    b[0, 0] = cfg.bos_token_id + 500 if cfg.vocab_size > 2000 else 300
    b[0, 5:9] = torch.arange(300, 304)
    return b


CASES = [("vlm", "small"), ("text", "small"), ("vlm", "tekken"), ("text", "tekken")]


@pytest.mark.parametrize("kind,vocab", CASES)
def test_fp32_logits_parity(ckpt_factory, kind: str, vocab: str) -> None:
    path = ckpt_factory(vlm=kind == "vlm", vocab=vocab, seed=11)
    ours, twin = load(path, dtype="float32"), load_twin(path, dtype="float32")
    ids, pix, sizes = _prompt(ours.config, 0, kind == "vlm")
    block = _block(ours.config)
    with torch.no_grad():
        a, b = _run_ours(ours, ids, pix, sizes, block), _run_twin(twin, ids, pix, sizes, block)
    for phase, x, y in zip(("prefill", "diffusion", "commit", "diffusion-after-commit"), a, b):
        assert x.shape == y.shape, phase
        diff = (x - y).abs().max().item()
        assert diff <= FP32_ATOL, f"{phase}: max |diff| {diff:.3e} > {FP32_ATOL}"
        assert torch.equal(x.argmax(-1), y.argmax(-1)), f"{phase}: argmax differs"


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_bf16_logits_within_twice_the_twins_error(ckpt_factory, kind: str) -> None:
    path = ckpt_factory(vlm=kind == "vlm", vocab="small", seed=12)
    gold = load_twin(path, dtype="float32")
    ours, twin = load(path, dtype="bfloat16"), load_twin(path, dtype="bfloat16")
    ids, pix, sizes = _prompt(ours.config, 1, kind == "vlm")
    block = _block(ours.config)
    with torch.no_grad():
        ref = _run_twin(gold, ids, pix, sizes, block)
        a = _run_ours(ours, ids, pix, sizes, block)
        b = _run_twin(twin, ids, pix, sizes, block)
    for phase, r, x, y in zip(("prefill", "diffusion", "commit", "diffusion-after-commit"), ref, a, b):
        ulp = r.abs().max().item() * 2**-8
        err_ours, err_twin = (x - r).abs().max().item(), (y - r).abs().max().item()
        assert err_ours <= 2 * err_twin + ulp, f"{phase}: ours {err_ours:.3e} vs twin {err_twin:.3e}"
        agree = (x.argmax(-1) == r.argmax(-1)).float().mean().item()
        print(f"{kind} {phase}: bf16 err ours {err_ours:.3e} twin {err_twin:.3e}, argmax agreement {agree:.3f}")


def test_ragged_left_padding_matches_unpadded(vlm_ckpt) -> None:
    """A left-padded row gives the same logits as that row alone (padding is masked, positions shifted)."""
    model = load(vlm_ckpt)
    ids, _, _ = _prompt(model.config, 2, False)
    short = ids[:, 10:]
    padded = torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1)
    both = torch.cat([ids, padded])
    pad = torch.tensor([0, 10])
    block = _block(model.config)
    with torch.no_grad():
        c2 = model.new_cache(2, ids.shape[1] + 32, pad=pad)
        model.forward_hidden(model.embed(both), cache=c2, start=0)
        h2 = model.forward_hidden(model.embed(block.expand(2, -1)), cache=c2, start=ids.shape[1], mode="diffusion")
        c1 = model.new_cache(1, short.shape[1] + 32)
        model.forward_hidden(model.embed(short), cache=c1, start=0)
        h1 = model.forward_hidden(model.embed(block), cache=c1, start=short.shape[1], mode="diffusion")
    assert (h2[1] - h1[0]).abs().max().item() <= 1e-5
