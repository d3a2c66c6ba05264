"""Autoregressive decoding over the static cache (upstream ``ar_generate``): prefill, then one causal forward
of one token per step with only the last position through the head.

NFE convention (upstream's): one per generated token; the prefill's logit gives the first token and the last
token is never forwarded. Stop rule: every row has just produced an EOS (batch-coupled, upstream), or each
row at its own first EOS under ``per_row_eos`` (rows then equal their runs alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..generate import _seed_tokens, prefill
from ..model import NLDModel
from ..sampling import GenerationResult, NoiseSource, SamplingPolicy

__all__ = ["generate_ar", "ar_step"]


def ar_step(model: NLDModel, cache: object, tok: torch.Tensor, start: int) -> torch.Tensor:
    """One causal forward of ``tok`` int64 [B] at cache slot ``start`` (writes its K/V) -> next logits [B, V]."""
    hidden = model.forward_hidden(model.embed(tok[:, None]), cache=cache, start=start, mode="causal")
    cache.length = start + 1  # type: ignore[attr-defined]
    return model.head(hidden[:, -1])


@torch.inference_mode()
def generate_ar(model: NLDModel, ids: torch.Tensor, pad: torch.Tensor, feats: torch.Tensor | None, *,
                max_new_tokens: int, temperature: float, eos: torch.Tensor, noise: NoiseSource | None,
                exclude_id: int | None, policy: SamplingPolicy,
                callback: Callable[[int, list[list[int]]], bool | None] | None = None,
                callback_every: int = 32) -> GenerationResult:
    """AR decoding of the left-padded prompts ``ids`` int64 [B, P] (``pad`` int64 [B]; ``feats`` the projected
    image features or None) -> :class:`GenerationResult` (``trace`` empty). ``callback(i, rows_so_far)`` runs
    every ``callback_every`` tokens; returning False stops."""
    t0 = time.perf_counter()
    b, p = ids.shape
    cache, last = prefill(model, ids, pad, max_new_tokens, feats)
    timings = {"prefill": time.perf_counter() - t0, "decode": 0.0}
    tokens = torch.empty(b, max_new_tokens, dtype=torch.long, device=ids.device)
    finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
    row_nfe = torch.zeros(b, dtype=torch.long, device=ids.device)
    t1 = time.perf_counter()
    n, forwards = 0, 1
    for step in range(max_new_tokens):
        tok = _seed_tokens(last, temperature, noise, exclude_id)
        tokens[:, step] = tok
        n = step + 1
        row_nfe += (~finished).long()
        is_eos = torch.isin(tok, eos)
        if policy.per_row_eos:
            finished |= is_eos
            stop = bool(finished.all())
        else:
            stop = bool(is_eos.all()) if eos.numel() else False
        if not stop and callback is not None and n % callback_every == 0 and \
                callback(n // callback_every - 1, tokens[:, :n].tolist()) is False:
            stop = True
        if stop:
            break
        if step < max_new_tokens - 1:
            last = ar_step(model, cache, tok, p + step)
            forwards += 1
    timings["decode"] = time.perf_counter() - t1
    rows = tokens[:, :n].tolist()
    if policy.per_row_eos:
        eos_set = set(eos.tolist())
        rows = [r[:next((i + 1 for i, t in enumerate(r) if t in eos_set), len(r))] for r in rows]
        nfe_rows = row_nfe.tolist()
    else:
        nfe_rows = [n] * b
    return GenerationResult(rows, n, [], nfe_rows, timings, forwards=forwards)
