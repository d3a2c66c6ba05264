"""Linear self-speculation over the static cache (upstream ``linear_spec_generate``), batched.

Per iteration and row: a diffusion draft of ``[seed, MASK x (L-1)]`` (draft adapter on) whose K/V land in the
scratch slots after the row's committed prefix, a causal verify over the drafted block (adapter off) that
overwrites those slots with causal K/V, acceptance = 1 + the longest prefix where the verify agrees with the
draft, and the crop as a length change: the row's cached length grows by the accepted count and the slots
after it are simply not attended to any more (no copy).

Rows are independent (upstream runs one row; here each row equals its run alone): every row has its own cached
length, so after ragged acceptances the rows' blocks sit at different slots (``row_start`` of
:meth:`NLDModel.forward_hidden`). A row that finished (EOS, or ``max_new_tokens`` emitted) is carried along
without effect. ``nfe`` counts the batch's forwards; ``row_nfe`` each row's own count (its NFE alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..generate import _seed_tokens, prefill
from ..kernels.head_confidence import first_argmax, head_confidence_argmax
from ..model import NLDModel
from ..sampling import GenerationResult, NoiseSource, SamplingPolicy, SpecStep, gumbel_argmax

__all__ = ["generate_linear_spec", "draft_step", "verify_step", "reveal_threshold"]


def draft_step(model: NLDModel, cache: object, block: torch.Tensor, lens: list[int], *, temperature: float,
               noise: NoiseSource | None, exclude_id: int | None, need_conf: bool,
               lora: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One diffusion forward of ``block`` int64 [B, L] after each row's cached prefix (``lens``), writing scratch
    K/V only -> (tokens int64 [B, L], confidence [B, L] in the model dtype or None unless ``need_conf``): argmax
    (Gumbel sample at T > 0) and ``softmax(logits / T)`` of the choice (``T = 1`` at T = 0)."""
    b, length = block.shape
    hidden = model.forward_hidden(model.embed(block), cache=cache, row_start=lens, mode="diffusion", lora=lora)
    flat = hidden.reshape(b * length, -1)
    if temperature > 0:
        assert noise is not None
        logits = model.head(flat)
        choice = logits
        if exclude_id is not None:
            choice = logits.clone()
            choice[:, exclude_id] = float("-inf")
        u = noise.uniform((b, length, logits.shape[-1]), block.device).view(b * length, -1)
        tok = gumbel_argmax(choice, temperature, u)
        conf = torch.gather(F.softmax(logits / temperature, dim=-1), -1, tok[:, None]).squeeze(-1)
        return tok.view(b, length), conf.view(b, length)
    if need_conf:
        tok, conf = head_confidence_argmax(flat, model.diffusion_head.weight, exclude_id=exclude_id)
        return tok.view(b, length), conf.to(model.dtype).view(b, length)
    logits = model.head(flat)
    if exclude_id is not None:
        logits[:, exclude_id] = float("-inf")
    return first_argmax(logits).view(b, length), None


def reveal_threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Upstream's draft reveal -> bool [B, L]: masked positions with ``conf >= threshold`` (compared in ``conf``'s
    dtype), or, in a row where none passes, its single most confident masked position (the lowest on ties).
    Rows without a masked position reveal nothing."""
    conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    reveal = masked & (conf >= torch.tensor(threshold, dtype=conf.dtype, device=conf.device))
    forced = masked.any(1) & ~reveal.any(1)
    top = conf.float().argmax(1)
    reveal[forced, top[forced]] = True
    return reveal


def verify_step(model: NLDModel, cache: object, block: torch.Tensor, lens: list[int], *, temperature: float,
                noise: NoiseSource | None, exclude_id: int | None) -> torch.Tensor:
    """The causal verify of ``block`` int64 [B, L] after each row's prefix (writes its K/V) -> the verify's
    choice int64 [B, L] at every position (``[:, i]`` is the token after ``block[:, i]``)."""
    b, length = block.shape
    hidden = model.forward_hidden(model.embed(block), cache=cache, row_start=lens, mode="causal")
    logits = model.head(hidden.reshape(b * length, -1))
    return _seed_tokens(logits, temperature, noise, exclude_id).view(b, length)


@torch.inference_mode()
def generate_linear_spec(model: NLDModel, ids: torch.Tensor, pad: torch.Tensor, feats: torch.Tensor | None, *,
                         max_new_tokens: int, block_length: int, threshold: float, temperature: float,
                         eos: torch.Tensor, noise: NoiseSource | None, exclude_id: int | None,
                         policy: SamplingPolicy, use_lora: bool = True,
                         callback: Callable[[int, list[list[int]]], bool | None] | None = None) -> GenerationResult:
    """Linear self-speculation for the left-padded prompts ``ids`` int64 [B, P] (``pad`` int64 [B], ``feats``
    the projected image features or None) -> :class:`GenerationResult` with ``spec_trace``. The draft adapter
    (``model.draft_lora``) is on during draft forwards when present and ``use_lora``. ``callback(i, rows)``
    after each iteration; returning False stops."""
    mask_id, length = model.config.mask_token_id, block_length
    lora = use_lora and model.draft_lora is not None
    eos_set = set(eos.tolist())
    t0 = time.perf_counter()
    b, p = ids.shape
    cache, last = prefill(model, ids, pad, max_new_tokens + length, feats)
    seed = _seed_tokens(last, temperature, noise, exclude_id)
    timings = {"prefill": time.perf_counter() - t0, "draft": 0.0, "verify": 0.0}
    nfe, row_nfe = 1, [1] * b
    out = [[s] for s in seed.tolist()]
    active = [r[0] not in eos_set and max_new_tokens > 1 for r in out]
    lens = [p] * b
    top = cache.max_len - length
    dev = ids.device
    trace: list[list[SpecStep | None]] = []
    it = 0
    while any(active):
        act = torch.tensor(active, device=dev)
        block = torch.full((b, length), mask_id, dtype=torch.long, device=dev)
        block[:, 0] = seed
        budget = (block == mask_id).sum(1)
        # finished rows keep running harmlessly: their slots are clamped inside the cache, their results unused
        starts = [min(n, top) for n in lens]
        draft_nfe = torch.zeros(b, dtype=torch.long, device=dev)
        drafting = act & (block == mask_id).any(1)
        ta = time.perf_counter()
        while bool(drafting.any()):
            masked = (block == mask_id) & drafting[:, None]
            tok, conf = draft_step(model, cache, block, starts, temperature=temperature, noise=noise,
                                   exclude_id=exclude_id, need_conf=threshold > 0, lora=lora)
            nfe += 1
            draft_nfe += drafting.long()
            reveal = reveal_threshold(conf, masked, threshold) if threshold > 0 else masked
            block = torch.where(reveal, tok, block)
            if threshold == 0:
                break
            drafting = drafting & (block == mask_id).any(1) & (draft_nfe < budget)
        tb = time.perf_counter()
        verify = verify_step(model, cache, block, starts, temperature=temperature, noise=noise,
                             exclude_id=exclude_id)
        nfe += 1
        agree = (verify[:, :-1] == block[:, 1:]).long()
        accepted = 1 + agree.cumprod(1).sum(1)
        seed = verify.gather(1, (accepted - 1)[:, None]).squeeze(1)
        timings["draft"] += tb - ta
        timings["verify"] += time.perf_counter() - tb
        acc_l, ver_l, blk_l, dn_l = accepted.tolist(), verify.tolist(), block.tolist(), draft_nfe.tolist()
        step: list[SpecStep | None] = []
        for r in range(b):
            if not active[r]:
                step.append(None)
                continue
            n = acc_l[r]
            step.append(SpecStep(tuple(blk_l[r]), tuple(ver_l[r]), n, dn_l[r]))
            row_nfe[r] += dn_l[r] + 1
            lens[r] += n  # the crop: keep the seed and the accepted draft tokens, drop the rest by length
            emitted = ver_l[r][:n]
            cut = next((i for i, t in enumerate(emitted) if t in eos_set), None)
            out[r] += emitted if cut is None else emitted[:cut + 1]
            active[r] = cut is None and len(out[r]) < max_new_tokens
        trace.append(step)
        if callback is not None and callback(it, [list(r) for r in out]) is False:
            break
        it += 1
    if policy.truncate_overshoot:
        out = [r[:max_new_tokens] for r in out]
    # every forward run (prefill, drafts, verifies) is counted in nfe, upstream's convention for this mode
    return GenerationResult(out, nfe, [], row_nfe, timings, spec_trace=trace, forwards=nfe)
