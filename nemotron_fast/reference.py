"""The reference block-diffusion sampler: the upstream algorithm (``spec/sampler.md``), quirks included.

This is the slow ground truth the fast sampler must match token for token and NFE for NFE. It is written in the
upstream style on purpose: per-row Python loops, a softmax over the full vocabulary in the logits dtype, a
transformers ``DynamicCache``, the batch-coupled EOS rules. The per-step logic is split into small functions over
plain tensors (:func:`propose`, :func:`select_threshold`, :func:`select_topk`, :func:`eos_stop_rows`) so it can be
tested on synthetic logits without a model.

One generation, for ``B`` rows, block length ``L``, ``spb`` steps per block:

1. prefill (causal, writes the cache, not counted in NFE); seed = argmax of the last logit (Gumbel sample at T > 0);
2. per block: ``[seed, MASK x (L-1)]``; up to ``spb`` denoise steps (diffusion forward, NFE + 1; reveal by
   threshold or by the even schedule; stop early when no MASK is left or an EOS is settled in any row);
3. commit: causal forward over the block (NFE + 1), next seed from its last logit; stop once every row has an EOS.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .sampling import (
    GenerationResult,
    NoiseSource,
    SamplingPolicy,
    check_mode,
    even_schedule,
    gumbel_argmax,
    resolve_schedule,
)

__all__ = ["generate", "propose", "select_threshold", "select_topk", "eos_stop_rows", "first_eos", "pick_next",
           "get_twin"]


# ----------------------------------------------------------------------------------------------------------------
# Step logic on plain tensors
# ----------------------------------------------------------------------------------------------------------------

def _exclude(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    out = logits.clone()
    out[..., token_id] = float("-inf")
    return out


def pick_next(last_logits: torch.Tensor, temperature: float, u: torch.Tensor | None = None,
              exclude_id: int | None = None) -> torch.Tensor:
    """The AR seed ``[B]`` (long) from ``last_logits`` ``[B, V]``: argmax at T = 0 (lowest id on ties), else the
    Gumbel-max sample ``argmax(exp(l) / (-log u) ** T)`` with ``u`` ``[B, V]`` float64. ``exclude_id`` (the
    ``exclude_mask`` policy) can never be chosen."""
    if exclude_id is not None:
        last_logits = _exclude(last_logits, exclude_id)
    if temperature > 0:
        if u is None:
            raise ValueError("temperature > 0 needs the uniform noise tensor u")
        return gumbel_argmax(last_logits, temperature, u.to(last_logits.device))
    return torch.argmax(last_logits, dim=-1)


def propose(logits: torch.Tensor, block: torch.Tensor, mask_id: int, temperature: float = 0.0,
            u: torch.Tensor | None = None, exclude_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens and their confidence for one denoise step.

    ``logits`` ``[B, L, V]`` (model dtype), ``block`` ``[B, L]`` long. Returns ``x0`` ``[B, L]`` long (argmax, or
    Gumbel-max with ``u`` ``[B, L, V]`` float64 at T > 0; existing tokens kept at non-MASK positions) and ``conf``
    ``[B, L]`` in the logits dtype: ``softmax(logits)[x0]`` of the unscaled, noise-free logits, computed in the
    logits dtype (so rounded to it), ``-inf`` at non-MASK positions. The MASK id stays a candidate unless
    ``exclude_mask``: then it is removed from the choice only, and the confidence stays the probability under
    the unmodified logits (the fused kernels compute it that way).
    """
    choice = _exclude(logits, mask_id) if exclude_mask else logits
    if temperature > 0:
        if u is None:
            raise ValueError("temperature > 0 needs the uniform noise tensor u")
        x0 = gumbel_argmax(choice, temperature, u.to(logits.device))
    else:
        x0 = torch.argmax(choice, dim=-1)
    p = F.softmax(logits, dim=-1)
    conf = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    masked = block == mask_id
    x0 = torch.where(masked, x0, block)
    conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    return x0, conf


def _top1_lowest(conf_row: torch.Tensor, masked_row: torch.Tensor) -> int:
    """Position of the highest confidence among masked positions, the lowest position among equals (upstream's
    ``torch.topk`` leaves the order of equal values unspecified; we pin it)."""
    c = conf_row[masked_row]
    best = c.max()
    candidates = torch.nonzero(masked_row).squeeze(-1)[c == best]
    if candidates.numel() == 0:  # all-NaN confidences: fall back to the first masked position
        return int(torch.nonzero(masked_row)[0])
    return int(candidates[0])


def select_threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reveal mask ``[B, L]`` (bool) for the threshold rule: in every row that still has a MASK, the single most
    confident masked position is always revealed; every other masked position iff ``conf >= threshold``, compared
    in ``conf``'s dtype (bf16: 0.9 becomes 0.8984375, exactly as upstream's tensor-vs-float comparison)."""
    thr = torch.tensor(threshold, dtype=conf.dtype, device=conf.device)
    reveal = masked & (conf >= thr)
    for j in range(conf.shape[0]):
        if masked[j].any():
            reveal[j, _top1_lowest(conf[j], masked[j])] = True
    return reveal


def select_topk(conf: torch.Tensor, masked: torch.Tensor, k: Sequence[int]) -> torch.Tensor:
    """Reveal mask ``[B, L]`` (bool): the ``k[j]`` most confident masked positions of row ``j``, ties broken to the
    lowest position (stable descending sort)."""
    reveal = torch.zeros_like(masked)
    for j in range(conf.shape[0]):
        kj = min(int(k[j]), int(masked[j].sum()))
        if kj <= 0:
            continue
        order = torch.sort(conf[j], descending=True, stable=True).indices
        order = order[masked[j][order]]
        reveal[j, order[:kj]] = True
    return reveal


def _is_eos(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        out |= tokens == e
    return out


def eos_stop_rows(block: torch.Tensor, mask_id: int, eos_ids: Sequence[int]) -> torch.Tensor:
    """Per row ``[B]`` (bool): the block holds an EOS and no MASK before its first EOS. The reference leaves the
    block when ANY row says so (batch-coupled); ``per_row_eos`` stops only that row."""
    eos = _is_eos(block, eos_ids)
    at_or_after = eos.cumsum(dim=1) > 0
    mask_before = (block == mask_id) & ~at_or_after
    return eos.any(dim=1) & ~mask_before.any(dim=1)


def first_eos(tokens: torch.Tensor, eos_ids: Sequence[int]) -> list[int | None]:
    """Offset of the first EOS of each row of ``tokens`` ``[B, N]``, ``None`` where a row has none."""
    eos = _is_eos(tokens, eos_ids)
    return [int(torch.nonzero(r)[0]) if r.any() else None for r in eos]


# ----------------------------------------------------------------------------------------------------------------
# Model access
# ----------------------------------------------------------------------------------------------------------------

def get_twin(model: Any) -> Any:
    """The object the reference drives: ``model`` itself when it is a twin (``is_reference_twin``), else the twin
    loaded from ``model.checkpoint_path`` (or a path given directly) with the model's device and dtype, cached on
    the object as ``_nf_twin``."""
    if getattr(model, "is_reference_twin", False):
        return model
    from .hf_twin import load_twin

    if isinstance(model, (str, Path)):
        return load_twin(model)
    cached = getattr(model, "_nf_twin", None)
    if cached is not None:
        return cached
    path = getattr(model, "checkpoint_path", None) or getattr(model, "path", None)
    if path is None:
        raise TypeError(f"reference.generate needs a TwinModel, a checkpoint path, or a model with a "
                        f"'checkpoint_path' attribute; got {type(model).__name__}")
    twin = load_twin(path, device=getattr(model, "device", "cpu"), dtype=getattr(model, "dtype", None))
    try:
        # plain attribute, not a registered submodule: the twin's weights stay out of parameters()/state_dict()
        object.__setattr__(model, "_nf_twin", twin)
    except AttributeError:  # frozen / slotted objects: no cache, still correct
        pass
    return twin


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

def _validate(twin: Any, input_ids: Any, pixel_values: Any, image_sizes: Any, temperature: float,
              threshold: float | None, eos: tuple[int, ...], mask_id: int) -> None:
    cfg = twin.config
    vocab = cfg.vocab_size
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D [batch, prompt_len] tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab}): min {lo}, max {hi}")
    for name, v in (("mask_token_id", mask_id), *((f"eos_token_id {e}", e) for e in eos)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise ValueError(f"{name} must be an id in [0, {vocab}), got {v!r}")
    if mask_id in eos:
        raise ValueError(f"mask_token_id {mask_id} cannot also be an EOS id")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(
            temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be None or a number in [0, 1], got {threshold!r}")
    image_id = cfg.image_pad_token_id if getattr(cfg, "is_vlm", False) else None
    n_image_tokens = int((input_ids == image_id).sum()) if image_id is not None else 0
    if pixel_values is None:
        if image_sizes is not None:
            raise ValueError("image_sizes was given without pixel_values")
        if getattr(cfg, "is_vlm", False) and n_image_tokens:
            raise ValueError(f"input_ids hold {n_image_tokens} image tokens (id {image_id}) but no pixel_values "
                             "were given")
        return
    if not getattr(cfg, "is_vlm", False):
        raise ValueError("pixel_values were given but this checkpoint is text-only (no vision tower)")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a [n_images, 3, H, W] tensor, got {shape}")
    if n_image_tokens == 0:
        raise ValueError(f"pixel_values were given but input_ids hold no image token (id {image_id})")
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes)
        if sizes.dim() != 2 or sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(f"image_sizes must be [n_images, 2] = [{pixel_values.shape[0]}, 2], got "
                             f"{tuple(sizes.shape)}")
        h, w = pixel_values.shape[-2:]
        if bool((sizes < 1).any()) or bool((sizes[:, 0] > h).any()) or bool((sizes[:, 1] > w).any()):
            raise ValueError(f"image_sizes {sizes.tolist()} must lie within the pixel_values size ({h}, {w})")


def _eos_ids(twin: Any, eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return tuple(twin.config.eos_token_ids)
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        return (eos_token_id,)
    return tuple(eos_token_id)


class _Clock:
    """Per-phase wall time; synchronises CUDA so queued kernels land in the right phase."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - self._t


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    steps: int | None = None,
    block_length: int = 32,
    threshold: float | None = 0.9,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    policy: SamplingPolicy | None = None,
    mask_token_id: int | None = None,
    mode: str = "diffusion",
    draft_lora: bool = True,
) -> GenerationResult:
    """Run the reference sampler of one decoding mode: block diffusion (``mode="diffusion"``, the default, below),
    or upstream's ``ar_generate`` (``"ar"``) / ``linear_spec_generate`` (``"linear_spec"``), see
    :mod:`nemotron_fast.reference_modes`. The other modes ignore ``steps``; ``ar`` ignores ``block_length`` and
    ``threshold``; ``linear_spec`` reads ``threshold=None`` as 0 (one-pass draft), runs one row at a time and
    uses the checkpoint's draft adapter during draft forwards when it has one and ``draft_lora`` is True.

    ``model``: a :class:`~nemotron_fast.hf_twin.TwinModel`, a checkpoint path, or a model object with
    ``checkpoint_path`` (its twin is loaded once and cached as ``_nf_twin``). ``input_ids`` ``[B, P]`` long
    (rows share the prompt length, as upstream); ``pixel_values`` ``[n_images, 3, H, W]`` and ``image_sizes``
    ``[n_images, 2]`` for the VLM. ``steps=None`` is the text call shape (``block_length`` steps per block); an
    explicit ``steps`` must be a multiple of ``ceil(max_new_tokens / block_length)``. ``threshold=None`` reveals
    by the even schedule. ``eos_token_id`` defaults to every EOS id of the config (an empty list disables EOS
    stops). ``seed`` seeds the :class:`NoiseSource` used at ``temperature > 0``. ``policy`` switches on opt-in
    departures (default: none, the reference algorithm).

    Returns a :class:`GenerationResult`: completions cut to ``max_new_tokens`` (trimmed at the EOS as upstream),
    the NFE (prefill excluded), the per-step reveal trace and per-phase timings.
    """
    twin = get_twin(model)
    cfg = twin.config
    policy = policy or SamplingPolicy()
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    eos = _eos_ids(twin, eos_token_id)
    _validate(twin, input_ids, pixel_values, image_sizes, temperature, threshold, eos, mask_id)
    if check_mode(mode) != "diffusion":
        from . import reference_modes

        resolve_schedule(max_new_tokens, block_length, None)  # the same checks of the two numbers
        prompt = input_ids.to(device=twin.device, dtype=torch.long)
        if mode == "ar":
            return reference_modes.generate_ar(twin, prompt, pixel_values, image_sizes, max_new_tokens=max_new_tokens,
                                               temperature=temperature, eos=eos, seed=seed, policy=policy)
        return reference_modes.generate_linear_spec(
            twin, prompt, pixel_values, image_sizes, max_new_tokens=max_new_tokens, block_length=block_length,
            threshold=float(threshold or 0.0), temperature=temperature, eos=eos, mask_id=mask_id, seed=seed,
            policy=policy, use_lora=draft_lora)
    sched = resolve_schedule(max_new_tokens, block_length, steps)
    n_rows, length, spb = input_ids.shape[0], sched.block_length, sched.steps_per_block
    vocab = cfg.vocab_size
    device = twin.device
    noise = NoiseSource(seed) if temperature > 0 else None
    exclude = mask_id if policy.exclude_mask else None
    clock = _Clock(device)

    def draw(shape: tuple[int, ...]) -> torch.Tensor | None:
        return noise.uniform(shape, device) if noise is not None else None

    # Prefill: vision tower + causal forward over the prompt; writes the cache, not counted in NFE.
    prompt = input_ids.to(device=device, dtype=torch.long)
    cache = twin.new_cache()
    clock.start()
    embeds = twin.embed(prompt, pixel_values, image_sizes)
    clock.stop("vision")
    clock.start()
    logits = twin.causal_forward(embeds, cache)
    seed_tok = pick_next(logits[:, -1], temperature, draw((n_rows, vocab)), exclude)
    clock.stop("prefill")

    done_blocks: list[torch.Tensor] = []
    trace: list[list[list[int]]] = []
    nfe = 0
    row_nfe = [0] * n_rows
    # per_row_eos: rows whose completion already holds an EOS take no further part.
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)

    for b in range(sched.num_blocks):
        block = torch.full((n_rows, length), mask_id, dtype=torch.long, device=device)
        block[:, 0] = seed_tok
        # The schedule counts each row's masks at block start (L-1, or L when the seed itself is the MASK id).
        n_masked0 = (block == mask_id).sum(dim=1).tolist()
        per_step = [even_schedule(int(n), spb) for n in n_masked0]
        row_stopped = finished.clone()
        for i in range(spb):
            masked = block == mask_id
            active = ~row_stopped & masked.any(dim=1)
            if policy.per_row_eos:
                masked = masked & active.unsqueeze(1)
            if not masked.any():
                break
            clock.start()
            logits = twin.diffusion_forward(twin.embed(block), cache)
            clock.stop("denoise")
            nfe += 1
            for j in range(n_rows):
                if not policy.per_row_eos or bool(active[j]):
                    row_nfe[j] += 1
            clock.start()
            x0, conf = propose(logits, block, mask_id, temperature, draw((n_rows, length, vocab)),
                               policy.exclude_mask)
            if threshold is not None:
                reveal = select_threshold(conf, masked, threshold)
            else:
                reveal = select_topk(conf, masked, [per_step[j][i] for j in range(n_rows)])
            if policy.finish_last_step and i == spb - 1:
                reveal = masked.clone()
            block = torch.where(reveal, x0, block)
            trace.append([(torch.nonzero(reveal[j]).squeeze(-1) + b * length).tolist() for j in range(n_rows)])
            stop = eos_stop_rows(block, mask_id, eos) if eos else torch.zeros_like(finished)
            clock.stop("select")
            if policy.per_row_eos:
                row_stopped |= stop
            elif stop.any():
                break

        # Commit: causal forward over the finished block writes its K/V; its last logit seeds the next block.
        clock.start()
        logits = twin.causal_forward(twin.embed(block), cache)
        nfe += 1
        for j in range(n_rows):
            if not policy.per_row_eos or not bool(finished[j]):
                row_nfe[j] += 1
        seed_tok = pick_next(logits[:, -1], temperature, draw((n_rows, vocab)), exclude)
        clock.stop("commit")
        done_blocks.append(block)

        if eos:
            gen = torch.cat(done_blocks, dim=1)
            has_eos = _is_eos(gen, eos).any(dim=1)
            if policy.per_row_eos:
                finished |= has_eos
                if bool(finished.all()):
                    break
            elif bool(has_eos.all()):
                break

    completion = torch.cat(done_blocks, dim=1)
    firsts = first_eos(completion, eos) if eos else [None] * n_rows
    rows = completion.tolist()
    if policy.per_row_eos:
        rows = [r if f is None else r[:f + 1] for r, f in zip(rows, firsts)]
    elif all(f is not None for f in firsts):
        keep = max(f for f in firsts if f is not None) + 1
        rows = [r[:keep] for r in rows]
    rows = [r[:max_new_tokens] for r in rows]
    if not policy.per_row_eos:
        row_nfe = [nfe] * n_rows
    return GenerationResult(completion_ids=rows, nfe=nfe, trace=trace, row_nfe=row_nfe, timings=clock.totals)
