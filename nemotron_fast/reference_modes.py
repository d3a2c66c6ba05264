"""The reference for the other two decoding modes of the same weights: upstream's ``ar_generate`` and
``linear_spec_generate`` (``spec/sampler.md``, "The other two decoding modes"), quirks included.

Like :mod:`nemotron_fast.reference` this is slow on purpose and runs on the transformers twin
(:mod:`nemotron_fast.hf_twin`) with a ``DynamicCache``; the fast paths in :mod:`nemotron_fast.decode` must give
the same tokens and NFE.

- **ar**: causal prefill; each step picks the next token from the last logit and forwards it. NFE = tokens
  generated (the prefill's logit gives the first, the last is never forwarded). Stops when EVERY row has just
  produced an EOS (batch-coupled) or at ``max_new_tokens``; the rows are returned whole, as upstream does.
- **linear_spec** (one row, as upstream): causal prefill (NFE 1) gives the seed; then per iteration a diffusion
  draft of ``[seed, MASK x (L-1)]`` with the draft adapter on (threshold 0: one forward fills every MASK;
  threshold > 0: forwards reveal positions with prob >= threshold, or else the single most confident one), a
  causal verify (adapter off) that writes the block's K/V, acceptance = 1 + the longest prefix where the
  verify's token i equals draft token i + 1, the cache cropped to its old length + accepted, the bonus token
  as the next seed. Cut at the first EOS; no cut at ``max_new_tokens`` (overshoot) unless the
  ``truncate_overshoot`` policy asks for it.

The one departure from upstream: a threshold > 0 draft stops after as many forwards as the block had masks
when it started (L - 1; L when the seed itself is the MASK id), the most it can take while it makes progress.
Upstream loops forever when a forward reveals only positions whose choice is the MASK id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .hf_twin import crop_cache
from .reference import _is_eos, pick_next, select_threshold
from .sampling import GenerationResult, NoiseSource, SamplingPolicy, SpecStep, gumbel_argmax

__all__ = ["generate_ar", "generate_linear_spec", "draft_propose", "accept_length"]


def draft_propose(logits: torch.Tensor, temperature: float, u: torch.Tensor | None = None,
                  exclude_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft tokens and their confidence from ``logits`` ``[B, L, V]`` (model dtype): argmax (T = 0) or the
    Gumbel-max sample with ``u`` ``[B, L, V]`` float64 (T > 0), and ``softmax(logits / T)`` of the chosen token
    (``T = 1`` at T = 0), computed in the logits dtype as upstream's draft loop does. ``exclude_id`` is never
    chosen (the ``exclude_mask`` policy); the confidence stays the unmodified softmax."""
    choice = logits
    if exclude_id is not None:
        choice = logits.clone()
        choice[..., exclude_id] = float("-inf")
    if temperature > 0:
        if u is None:
            raise ValueError("temperature > 0 needs the uniform noise tensor u")
        tok = gumbel_argmax(choice, temperature, u.to(logits.device))
        probs = F.softmax(logits / temperature, dim=-1)
    else:
        tok = torch.argmax(choice, dim=-1)
        probs = F.softmax(logits, dim=-1)
    return tok, torch.gather(probs, -1, tok.unsqueeze(-1)).squeeze(-1)


def accept_length(draft: Sequence[int], verify: Sequence[int]) -> int:
    """1 + the length of the longest prefix ``i = 0 .. L-2`` with ``verify[i] == draft[i + 1]``."""
    n = 1
    for i in range(len(draft) - 1):
        if verify[i] != draft[i + 1]:
            break
        n += 1
    return n


def _draw(noise: NoiseSource | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    return noise.uniform(shape, device) if noise is not None else None


@torch.no_grad()
def generate_ar(twin: Any, prompt: torch.Tensor, pixel_values: torch.Tensor | None,
                image_sizes: torch.Tensor | None, *, max_new_tokens: int, temperature: float,
                eos: tuple[int, ...], seed: int | None, policy: SamplingPolicy) -> GenerationResult:
    """Upstream ``ar_generate`` on the twin for ``prompt`` ``[B, P]`` (see the module docstring). ``per_row_eos``
    stops and cuts each row at its own first EOS (its NFE is its own token count)."""
    b, vocab, device = prompt.shape[0], twin.config.vocab_size, twin.device
    noise = NoiseSource(seed) if temperature > 0 else None
    exclude = twin.config.mask_token_id if policy.exclude_mask else None
    cache = twin.new_cache()
    logits = twin.causal_forward(twin.embed(prompt, pixel_values, image_sizes), cache)
    last = logits[:, -1]
    generated: list[torch.Tensor] = []
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    row_nfe = [0] * b
    nfe = 0
    for step in range(max_new_tokens):
        nfe += 1
        tok = pick_next(last, temperature, _draw(noise, (b, vocab), device), exclude)
        generated.append(tok)
        for j in range(b):
            row_nfe[j] += 0 if bool(finished[j]) else 1
        is_eos = _is_eos(tok, eos) if eos else torch.zeros_like(finished)
        if policy.per_row_eos:
            finished |= is_eos
            if bool(finished.all()):
                break
        elif bool(is_eos.all()):
            break
        if step < max_new_tokens - 1:
            last = twin.causal_forward(twin.embed(tok[:, None]), cache)[:, -1]
    rows = torch.stack(generated, dim=1).tolist()
    if policy.per_row_eos:
        eos_set = set(eos)
        rows = [r[:next((i + 1 for i, t in enumerate(r) if t in eos_set), len(r))] for r in rows]
    else:
        row_nfe = [nfe] * b
    return GenerationResult(completion_ids=rows, nfe=nfe, trace=[], row_nfe=row_nfe)


@torch.no_grad()
def generate_linear_spec(twin: Any, prompt: torch.Tensor, pixel_values: torch.Tensor | None,
                         image_sizes: torch.Tensor | None, *, max_new_tokens: int, block_length: int,
                         threshold: float, temperature: float, eos: tuple[int, ...], mask_id: int,
                         seed: int | None, policy: SamplingPolicy, use_lora: bool = True) -> GenerationResult:
    """Upstream ``linear_spec_generate`` on the twin for ``prompt`` ``[1, P]`` (see the module docstring), with the
    twin's draft adapter on during draft forwards when it has one and ``use_lora``."""
    if prompt.shape[0] != 1:
        raise ValueError(f"the reference linear_spec runs one row at a time, as upstream (got {prompt.shape[0]} "
                         "rows); the fast sampler batches")
    length, vocab, device = block_length, twin.config.vocab_size, twin.device
    noise = NoiseSource(seed) if temperature > 0 else None
    exclude = mask_id if policy.exclude_mask else None
    eos_set = set(eos)
    cache = twin.new_cache()
    logits = twin.causal_forward(twin.embed(prompt, pixel_values, image_sizes), cache)
    nfe = 1
    seed_tok = int(pick_next(logits[:, -1], temperature, _draw(noise, (1, vocab), device), exclude)[0])
    out = [seed_tok]
    trace: list[list[SpecStep | None]] = []
    if seed_tok not in eos_set:
        while len(out) < max_new_tokens:
            cache_len = cache.get_seq_length()
            block = torch.full((1, length), mask_id, dtype=torch.long, device=device)
            block[0, 0] = seed_tok
            budget = int((block == mask_id).sum())
            draft_nfe = 0
            with twin.draft_adapter(use_lora):
                while bool((block == mask_id).any()) and (threshold == 0 or draft_nfe < budget):
                    is_mask = block == mask_id
                    logits = twin.diffusion_forward(twin.embed(block), cache)
                    nfe += 1
                    draft_nfe += 1
                    tok, conf = draft_propose(logits, temperature, _draw(noise, (1, length, vocab), device),
                                              exclude)
                    if threshold > 0:
                        conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
                        reveal = select_threshold(conf, is_mask, threshold)
                    else:
                        reveal = is_mask
                    block = torch.where(reveal, tok, block)
                    if threshold == 0:
                        break
            logits = twin.causal_forward(twin.embed(block), cache)
            nfe += 1
            verify = pick_next(logits[0], temperature, _draw(noise, (length, vocab), device), exclude).tolist()
            draft = block[0].tolist()
            accepted = accept_length(draft, verify)
            trace.append([SpecStep(tuple(draft), tuple(verify), accepted, draft_nfe)])
            crop_cache(cache, cache_len + accepted)
            emitted = verify[:accepted]
            seed_tok = emitted[-1]
            cut = next((i for i, t in enumerate(emitted) if t in eos_set), None)
            if cut is not None:
                out += emitted[:cut + 1]
                break
            out += emitted
    if policy.truncate_overshoot:
        out = out[:max_new_tokens]
    return GenerationResult(completion_ids=[out], nfe=nfe, trace=[], row_nfe=[nfe], spec_trace=trace)
