"""The fast block-diffusion sampler: same tokens, same NFE as :mod:`nemotron_fast.reference`, far less work.

The loop is a handful of named functions over preallocated state (gpt-fast style):

- :func:`prefill` - vision tower + one causal forward over the prompt into a preallocated KV cache; only the
  last position goes through the head (it gives the first AR seed).
- :func:`denoise_step` - the block attends to the cache in diffusion mode; its K/V land in the scratch slots
  after the prefix (no concatenation), and the head runs only where the block is still masked in rows that are
  still stepping (CPU). On CUDA the loop runs the fixed-shape form of the same steps over the model's static
  decode state instead, captured once per shape as CUDA graphs (:mod:`nemotron_fast.decode.static`). On CUDA
  the head is fused with the confidence/argmax reduction in one Triton kernel, so the [N, V] logits never reach
  memory; on a CPU the fastest exact form is ``F.linear`` + a segment-max argmax + torch's one-pass softmax per
  row chunk (see ``kernels/head_confidence.py``).
- :func:`select` - forced top-1 + threshold (or even-schedule top-k) reveal, in place, on the device.
- :func:`commit` - one causal forward over the finished block that overwrites the scratch slots with causal
  K/V; only the block's last position goes through the head (the next seed).

Ragged batches are left-padded so every row's prefix ends at the same cache slot; padded slots are masked.

:func:`generate` also serves the other two decoding modes of the same weights (``mode="ar"`` and
``mode="linear_spec"``), whose loops live in :mod:`nemotron_fast.decode` and reuse :func:`prefill` and the
preallocated cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .kernels.head_confidence import head_confidence_argmax
from .kernels.unmask import select_unmask
from .model import KVCache, NLDModel
from .sampling import (
    GenerationResult,
    NoiseSource,
    SamplingPolicy,
    StepCallback,
    StepEvent,
    check_mode,
    gumbel_argmax,
    resolve_schedule,
)

__all__ = ["generate", "prefill", "denoise_step", "select", "commit", "BlockCallback"]

# Tests set this to run the CUDA-style loop (fixed-shape steps, lagged flags) on the CPU.
_GPU_STYLE_ON_CPU = False

# Called after each commit with (block index, completion ids so far per row); returning False stops generation.
BlockCallback = Callable[[int, list[list[int]]], "bool | None"]


@dataclass
class _State:
    """Per-call loop state. ``x`` holds every row's completion (MASK where not yet revealed)."""

    x: torch.Tensor  # int64 [B, num_blocks * L]
    active: torch.Tensor  # bool [B]: rows still generating (only changes under per_row_eos)
    row_nfe: torch.Tensor  # int64 [B]


def _pad_prompts(model: NLDModel, input_ids: torch.Tensor | Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a ragged list of prompts -> (ids int64 [B, P], pad int64 [B])."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, "
                             f"got {tuple(input_ids.shape)}")
        ids = input_ids.to(model.device, torch.long)
        return ids, torch.zeros(ids.shape[0], dtype=torch.long, device=model.device)
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in input_ids]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("input_ids must hold at least one non-empty prompt")
    p = max(r.numel() for r in rows)
    fill = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((len(rows), p), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - r.numel():] = r
    pad = torch.tensor([p - r.numel() for r in rows], dtype=torch.long)
    return ids.to(model.device), pad.to(model.device)


def _seed_tokens(logits: torch.Tensor, temperature: float, noise: NoiseSource | None,
                 exclude_id: int | None) -> torch.Tensor:
    """logits [B, V] -> the next AR token per row (argmax, or a Gumbel sample at T > 0)."""
    if exclude_id is not None:
        logits = logits.clone()
        logits[:, exclude_id] = float("-inf")
    if temperature > 0:
        assert noise is not None
        return gumbel_argmax(logits, temperature, noise.uniform(tuple(logits.shape), logits.device))
    return logits.argmax(dim=-1)


def prefill(model: NLDModel, ids: torch.Tensor, pad: torch.Tensor, gen_len: int,
            image_features: torch.Tensor | None = None, cache: KVCache | None = None) -> tuple[KVCache, torch.Tensor]:
    """Causal forward over the (left-padded) prompts into a cache sized for the whole completion.

    ids int64 [B, P], pad int64 [B], image_features [N_img_tokens, hidden] (the vision tower's projected output,
    computed once by the caller); ``cache``: where to write (default: a fresh one of ``P + gen_len`` slots) ->
    (the cache holding the prefix, last-position logits [B, V]).
    """
    b, p = ids.shape
    if cache is None:
        cache = model.new_cache(b, p + gen_len, pad=pad)
    embeds = model.embed(ids, image_features=image_features)
    hidden = model.forward_hidden(embeds, cache=cache, start=0, mode="causal")
    cache.length = p
    return cache, model.head(hidden[:, -1])


def denoise_step(model: NLDModel, cache: KVCache, block: torch.Tensor, start: int, *, temperature: float,
                 noise: NoiseSource | None, exclude_id: int | None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One diffusion forward of the block at cache slot ``start`` -> (x0 int64 [B, L], conf [B, L] in the logits
    dtype, -inf where the position is not masked). The head runs only on positions that are masked, in the rows
    ``rows`` (bool [B]) if given: a finished row costs no head work. (The CUDA path runs the fixed-shape form,
    :mod:`nemotron_fast.decode.static`.)"""
    mask_id = model.config.mask_token_id
    hidden = model.forward_hidden(model.embed(block), cache=cache, start=start, mode="diffusion")
    b, length = block.shape
    u = noise.uniform((b, length, model.config.vocab_size), block.device) if temperature > 0 else None
    want = block == mask_id
    if rows is not None:
        want = want & rows[:, None]
    idx = want.flatten().nonzero().squeeze(1)
    x0 = block.clone()
    conf = torch.full((b, length), float("-inf"), dtype=model.dtype, device=block.device)
    if idx.numel():
        flat_u = u.view(b * length, -1)[idx] if u is not None else None
        tok, c = head_confidence_argmax(hidden.view(b * length, -1)[idx], model.diffusion_head.weight,
                                        noise_u=flat_u, temperature=temperature, exclude_id=exclude_id)
        x0.view(-1)[idx] = tok
        conf.view(-1)[idx] = c.to(conf.dtype)
    return x0, conf


def select(x0: torch.Tensor, conf: torch.Tensor, block: torch.Tensor, mask_id: int, threshold: float | None,
           k: torch.Tensor, active: torch.Tensor, force_all: bool) -> torch.Tensor:
    """Reveal in place (forced top-1 + threshold, or exactly ``k[b]`` by confidence) -> revealed bool [B, L]."""
    return select_unmask(x0, conf, block, block == mask_id, threshold=threshold, k=k, active=active,
                         force_all=force_all)


def _even_k(n_masked: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """Per row, the even schedule's count for ``step``: n // steps, plus one for the first n % steps steps."""
    return n_masked // steps + (step < n_masked % steps).long()


def commit(model: NLDModel, cache: KVCache, block: torch.Tensor, start: int) -> torch.Tensor:
    """Causal forward over the finished block at cache slot ``start``, writing its K/V -> logits of its last
    position [B, V]."""
    hidden = model.forward_hidden(model.embed(block), cache=cache, start=start, mode="causal")
    cache.length = start + block.shape[1]
    return model.head(hidden[:, -1])


def _eos_done(block: torch.Tensor, mask_id: int, eos: torch.Tensor) -> torch.Tensor:
    """Per row: the block has an EOS with no MASK before its first EOS -> bool [B]."""
    is_eos = torch.isin(block, eos)
    before_first = is_eos.int().cumsum(1) == 0
    return is_eos.any(1) & ~((block == mask_id) & before_first).any(1)


@torch.inference_mode()
def generate(
    model: NLDModel,
    input_ids: torch.Tensor | Sequence,
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
    callback: BlockCallback | None = None,
    use_cuda_graphs: bool = True,
    mode: str = "diffusion",
    draft_lora: bool = True,
    on_step: StepCallback | None = None,
) -> GenerationResult:
    """Generation with the fast path in one of the three decoding modes; the result equals the reference's
    (:func:`nemotron_fast.reference.generate` with the same ``mode``) for the same call.

    ``mode="diffusion"`` (default) is block diffusion, described below. ``"ar"`` is upstream's ``ar_generate``
    and ``"linear_spec"`` upstream's ``linear_spec_generate`` (batched here, each row equal to its run alone),
    see :mod:`nemotron_fast.decode`: both ignore ``steps``; ``ar`` ignores ``block_length`` and ``threshold``;
    ``linear_spec`` reads ``threshold=None`` as 0 (one-pass draft) and switches the checkpoint's draft adapter
    (``linear_spec_lora/``) on for draft forwards when ``draft_lora`` is True. The callback runs after each
    ``block_length`` tokens (ar) or each verify (linear_spec).

    Args:
        model: an :class:`NLDModel` (see :func:`nemotron_fast.load`).
        input_ids: int64 [B, T], or a list of 1-D prompts of different lengths (left-padded internally).
        pixel_values: float [n_images, 3, H, W] for every image of every row, in prompt order; image_sizes
            int64 [n_images, 2].
        max_new_tokens: completion length cap; ``ceil(max_new_tokens / block_length)`` blocks are decoded.
        steps: total denoise steps (a multiple of the block count), or None for ``block_length`` per block.
        threshold: confidence threshold in [0, 1], or None for the even top-k schedule.
        temperature: 0 for argmax; > 0 samples with Gumbel noise from ``seed``: on the CPU the float64 noise the
            reference draws (so the two match exactly), on CUDA Philox noise generated inside the head kernel for
            the denoise steps (a different stream of the same distribution).
        eos_token_id: id(s) that end a completion (default: the config's EOS ids).
        policy: opt-in departures from the reference (default: none).
        callback: called after each commit; returning False stops generation after that block.
        use_cuda_graphs: on CUDA at T = 0, capture each block's denoise forward once and replay it.
        on_step: diffusion only: called with a :class:`~nemotron_fast.sampling.StepEvent` after every denoise
            step and commit (what was revealed, its tokens and confidence). Off by default; it reads the step's
            results on the host, so it costs a device sync per step.
    Returns:
        :class:`GenerationResult` with completion ids per row, NFE and the reveal trace.
    """
    policy = policy or SamplingPolicy()
    if check_mode(mode) != "diffusion":
        if on_step is not None:
            raise ValueError(f"on_step reports block-diffusion steps; mode {mode!r} has none")
        return _generate_other_mode(model, input_ids, pixel_values, image_sizes, mode=mode,
                                    max_new_tokens=max_new_tokens, block_length=block_length, threshold=threshold,
                                    temperature=temperature, eos_token_id=eos_token_id, seed=seed, policy=policy,
                                    callback=callback, draft_lora=draft_lora)
    sched = resolve_schedule(max_new_tokens, block_length, steps)
    inp = _prepare(model, input_ids, pixel_values, image_sizes, threshold=threshold, temperature=temperature,
                   eos_token_id=eos_token_id, seed=seed, policy=policy)
    ids, pad, feats, eos, exclude_id, noise = inp.ids, inp.pad, inp.feats, inp.eos, inp.exclude_id, inp.noise
    mask_id, length = model.config.mask_token_id, block_length
    b = ids.shape[0]
    dev = ids.device
    timings = dict.fromkeys(("vision", "prefill", "denoise", "select", "commit"), 0.0)
    timings["vision"] = inp.vision_time
    # CUDA: the fixed-shape steps over the static decode state (graphs at T = 0); CPU: the same loop with steps
    # that run the head only where it matters (see _EagerSteps)
    gpu_style = dev.type == "cuda" or _GPU_STYLE_ON_CPU
    t1 = time.perf_counter()
    if gpu_style:
        steps: _Steps = _StaticSteps(model, ids, pad, feats, sched.gen_length, length, exclude_id=exclude_id,
                                     graphs=temperature == 0 and use_cuda_graphs)
    else:
        steps = _EagerSteps(model, ids, pad, feats, sched.gen_length, length, exclude_id=exclude_id)
    last = steps.last
    st = _State(torch.full((b, sched.gen_length), mask_id, dtype=torch.long, device=dev),
                torch.ones(b, dtype=torch.bool, device=dev), torch.zeros(b, dtype=torch.long, device=dev))
    seed_tok = _seed_tokens(last, temperature, noise, exclude_id)
    timings["prefill"] = time.perf_counter() - t1
    o = _Opts(mask_id, threshold, sched.steps_per_block, temperature, noise, exclude_id, policy, eos, on_step)
    slots = sched.num_blocks * sched.steps_per_block
    rev_buf = torch.zeros(slots, b, length, dtype=torch.bool, device=dev)
    stepped_buf = torch.zeros(slots, b, dtype=torch.bool, device=dev)
    slot_block: list[int] = []
    commits = 0
    for blk in range(sched.num_blocks):
        block = st.x[:, blk * length:(blk + 1) * length]
        block[:, 0] = torch.where(st.active, seed_tok, block[:, 0])
        used = _denoise_block(steps, st, block, o, rev_buf[len(slot_block):], stepped_buf[len(slot_block):],
                              timings, (blk, len(slot_block) + commits))
        slot_block += [blk] * used
        tc = time.perf_counter()
        last = steps.commit(block)
        commits += 1
        st.row_nfe += st.active.long()
        seed_tok = _seed_tokens(last, temperature, noise, exclude_id)
        timings["commit"] += time.perf_counter() - tc
        if on_step is not None:
            on_step(StepEvent("commit", blk, used, len(slot_block) + commits, [[] for _ in range(b)],
                              block.tolist(), [[] for _ in range(b)]))
        has_eos = torch.isin(st.x[:, :(blk + 1) * length], eos).any(1)
        if policy.per_row_eos:
            st.active &= ~has_eos
            stop = not bool(st.active.any())
        else:
            stop = bool(has_eos.all())
        if callback is not None and callback(blk, _completions(st.x[:, :(blk + 1) * length], eos, sched.max_new_tokens,
                                                               policy.per_row_eos, final=False)) is False:
            stop = True
        if stop:
            break
    completions = _completions(st.x, eos, sched.max_new_tokens, policy.per_row_eos, final=True,
                               decoded=(blk + 1) * length)
    trace = _trace(rev_buf[:len(slot_block)], stepped_buf[:len(slot_block)], slot_block, length)
    nfe = len(trace) + commits
    return GenerationResult(completions, nfe, trace, st.row_nfe.tolist(), timings, forwards=1 + steps.forwards)


@dataclass
class _Inputs:
    """Validated, device-ready inputs shared by every decoding mode."""

    ids: torch.Tensor
    pad: torch.Tensor
    feats: torch.Tensor | None
    eos: torch.Tensor
    exclude_id: int | None
    noise: NoiseSource | None
    vision_time: float


def _prepare(model: NLDModel, input_ids: torch.Tensor | Sequence, pixel_values: torch.Tensor | None,
             image_sizes: torch.Tensor | None, *, threshold: float | None, temperature: float,
             eos_token_id: int | Sequence[int] | None, seed: int | None, policy: SamplingPolicy) -> _Inputs:
    """Check the sampling numbers, left-pad the prompts and run the vision tower once."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] or None, got {threshold}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cfg = model.config
    eos_ids = cfg.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    t0 = time.perf_counter()
    ids, pad = _pad_prompts(model, input_ids)
    feats = None
    if pixel_values is not None:
        if image_sizes is None:
            raise ValueError("pixel_values need image_sizes")
        feats = model.image_features(pixel_values.to(model.device), image_sizes)
    return _Inputs(ids, pad, feats, torch.tensor(eos_ids, dtype=torch.long, device=ids.device),
                   cfg.mask_token_id if policy.exclude_mask else None,
                   NoiseSource(seed) if temperature > 0 else None, time.perf_counter() - t0)


def _generate_other_mode(model: NLDModel, input_ids: torch.Tensor | Sequence, pixel_values: torch.Tensor | None,
                         image_sizes: torch.Tensor | None, *, mode: str, max_new_tokens: int, block_length: int,
                         threshold: float | None, temperature: float, eos_token_id: int | Sequence[int] | None,
                         seed: int | None, policy: SamplingPolicy, callback: BlockCallback | None,
                         draft_lora: bool) -> GenerationResult:
    """The ar / linear_spec fast paths (:mod:`nemotron_fast.decode`) after the shared input handling."""
    from .decode import generate_ar, generate_linear_spec

    resolve_schedule(max_new_tokens, block_length, None)  # validates both numbers
    inp = _prepare(model, input_ids, pixel_values, image_sizes, threshold=threshold, temperature=temperature,
                   eos_token_id=eos_token_id, seed=seed, policy=policy)
    common = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos=inp.eos, noise=inp.noise,
                  exclude_id=inp.exclude_id, policy=policy, callback=callback)
    if mode == "ar":
        result = generate_ar(model, inp.ids, inp.pad, inp.feats, callback_every=block_length, **common)
    else:
        result = generate_linear_spec(model, inp.ids, inp.pad, inp.feats, block_length=block_length,
                                      threshold=0.0 if threshold is None else float(threshold),
                                      use_lora=draft_lora, **common)
    result.timings["vision"] = inp.vision_time
    return result


@dataclass(frozen=True)
class _Opts:
    """Per-call constants of the denoise loop."""

    mask_id: int
    threshold: float | None
    spb: int
    temperature: float
    noise: NoiseSource | None
    exclude_id: int | None
    policy: SamplingPolicy
    eos: torch.Tensor
    on_step: StepCallback | None = None


class _Steps:
    """The two forwards of the loop over one call's cache: ``denoise(block, stepping) -> (x0, conf)`` and
    ``commit(block) -> last-position logits``; ``forwards`` counts the forwards run (prefill excluded)."""

    cache: KVCache
    last: torch.Tensor
    forwards: int

    def denoise(self, block: torch.Tensor, stepping: torch.Tensor, temperature: float, noise: NoiseSource | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _EagerSteps(_Steps):
    """The CPU steps: a per-call cache, the block's cache offset a Python int, the head only over positions that
    are still masked in rows that are still stepping (the cheapest exact form without a GPU)."""

    def __init__(self, model: NLDModel, ids: torch.Tensor, pad: torch.Tensor, feats: torch.Tensor | None,
                 gen_len: int, length: int, *, exclude_id: int | None) -> None:
        self.model, self.length, self.exclude_id = model, length, exclude_id
        self.cache, self.last = prefill(model, ids, pad, gen_len, feats)
        self.start, self.forwards = ids.shape[1], 0

    def denoise(self, block: torch.Tensor, stepping: torch.Tensor, temperature: float, noise: NoiseSource | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        self.forwards += 1
        return denoise_step(self.model, self.cache, block, self.start, temperature=temperature, noise=noise,
                            exclude_id=self.exclude_id, rows=stepping)

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        last = commit(self.model, self.cache, block, self.start)
        self.start += self.length
        return last


class _StaticSteps(_Steps):
    """The CUDA steps (:mod:`nemotron_fast.decode.static`): the model's static cache for the batch bucket, block
    positions on the device, the backbone and the fused head over every position (a fixed shape), replayed as
    CUDA graphs when ``graphs`` (captured once per shape and model). Rows past the call's batch are fillers."""

    def __init__(self, model: NLDModel, ids: torch.Tensor, pad: torch.Tensor, feats: torch.Tensor | None,
                 gen_len: int, length: int, *, exclude_id: int | None, graphs: bool) -> None:
        from .decode.static import static_decode

        b, p = ids.shape
        self.model, self.b, self.length, self.exclude_id, self.forwards = model, b, length, exclude_id, 0
        sd = static_decode(model)
        # the noise at T > 0 is drawn per real row, so only graphed (T = 0) calls run at the bucket's size
        self.buf = buf = sd.buffers(b, p + gen_len, bucketed=graphs)
        buf.cache.pad.zero_()
        buf.cache.pad[:b] = pad
        buf.starts.fill_(p)
        self.cache, self.last = prefill(model, ids, pad, gen_len, feats, cache=buf.view(b, pad))
        self.block = buf.block(length)
        self.block.fill_(model.config.mask_token_id)
        self._denoise = sd.denoise_fn(buf, length, exclude_id=exclude_id, graphs=graphs)
        self._commit = sd.commit_fn(buf, length, graphs=graphs)
        self._denoise_noisy = None if graphs else self._eager_noisy
        self._philox: tuple[int, torch.Tensor] | None = None

    def _eager_noisy(self, temperature: float, noise: NoiseSource) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoise step at T > 0. On CUDA the Gumbel noise is Philox, generated inside the head kernel from
        the call's seed and a device-side counter (no float64 noise drawn on the host and copied); elsewhere it
        is the injected float64 noise the reference draws, so the two can be compared exactly."""
        b, n = self.block.shape
        m = self.model
        hidden = m.forward_hidden(m.embed(self.block), cache=self.buf.cache, starts=self.buf.starts,
                                  mode="diffusion")
        flat = hidden.view(b * n, -1)
        if self.block.is_cuda:
            if self._philox is None:
                self._philox = (int(noise.generator.initial_seed()) & (2**63 - 1),
                                torch.zeros(1, dtype=torch.int64, device=self.block.device))
            seed, offset = self._philox
            tok, c = head_confidence_argmax(flat, m.diffusion_head.weight, temperature=temperature,
                                            exclude_id=self.exclude_id, seed=seed, offset=offset)
            offset.add_(b * n * m.config.vocab_size)
        else:
            u = noise.uniform((b, n, m.config.vocab_size), self.block.device)
            tok, c = head_confidence_argmax(flat, m.diffusion_head.weight, noise_u=u.view(b * n, -1),
                                            temperature=temperature, exclude_id=self.exclude_id)
        is_mask = self.block == m.config.mask_token_id
        return (torch.where(is_mask, tok.view(b, n), self.block),
                torch.where(is_mask, c.view(b, n).to(m.dtype), float("-inf")))

    def denoise(self, block: torch.Tensor, stepping: torch.Tensor, temperature: float, noise: NoiseSource | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        self.forwards += 1
        self.block[:self.b].copy_(block)
        if temperature > 0:
            assert noise is not None and self._denoise_noisy is not None
            x0, conf = self._denoise_noisy(temperature, noise)
        else:
            x0, conf = self._denoise()
        return x0[:self.b], conf[:self.b]

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        self.block[:self.b].copy_(block)
        (logits,) = self._commit()
        self.cache.length += self.length
        return logits[:self.b]


def _denoise_block(steps: _Steps, st: _State, block: torch.Tensor, o: _Opts, rev_buf: torch.Tensor,
                   stepped_buf: torch.Tensor, timings: dict[str, float], where: tuple[int, int] = (0, 0)) -> int:
    """Up to ``spb`` denoise steps on ``block`` (in place). Returns the steps run.

    Each step records its reveals in ``rev_buf[s]`` [B, L] and the rows that really stepped in
    ``stepped_buf[s]`` [B], on the device. Before each step the host reads one flag (is any row still
    stepping?), so no forward ever runs for a finished block. ``where`` is (block index, forwards before this
    block), for ``o.on_step``'s events.
    """
    mask_id, policy = o.mask_id, o.policy
    stepping = st.active.clone()
    # the even schedule counts each row's masks at block start (L - 1, or L when the seed itself is MASK)
    n_masked = (block == mask_id).sum(1)
    used = 0
    for step in range(o.spb):
        has_mask = (block == mask_id).any(1) & stepping
        stepping = has_mask if policy.per_row_eos else stepping & has_mask.any()
        if not bool(stepping.any()):
            break
        ta = time.perf_counter()
        x0, conf = steps.denoise(block, stepping, o.temperature, o.noise)
        tb = time.perf_counter()
        k = _even_k(n_masked, o.spb, step)
        rev_buf[step] = select(x0, conf, block, mask_id, o.threshold, k, stepping,
                               policy.finish_last_step and step == o.spb - 1)
        stepped_buf[step] = stepping
        st.row_nfe += stepping.long()
        if o.on_step is not None:
            _emit_step(o.on_step, where[0], step, where[1] + step + 1, rev_buf[step], stepping, block, conf)
        done = _eos_done(block, mask_id, o.eos) & stepping
        stepping = stepping & ~done if policy.per_row_eos else stepping & ~done.any()
        used = step + 1
        timings["denoise"] += tb - ta
        timings["select"] += time.perf_counter() - tb
    return used


def _emit_step(on_step: StepCallback, blk: int, step: int, forwards: int, revealed: torch.Tensor,
               stepping: torch.Tensor, block: torch.Tensor, conf: torch.Tensor) -> None:
    """Read one denoise step's reveals to the host and hand them to ``on_step``."""
    rev = (revealed & stepping[:, None]).tolist()
    toks, cf = block.tolist(), conf.float().tolist()
    pos = [[i for i, r in enumerate(row) if r] for row in rev]
    on_step(StepEvent("denoise", blk, step, forwards, pos, [[toks[b][i] for i in p] for b, p in enumerate(pos)],
                      [[cf[b][i] for i in p] for b, p in enumerate(pos)]))


def _trace(rev: torch.Tensor, stepped: torch.Tensor, slot_block: list[int], length: int) -> list[list[list[int]]]:
    """Device reveal records -> per real step, per row, sorted completion offsets (one transfer at the end)."""
    real = stepped.any(1).tolist()
    b = rev.shape[1]
    out: list[list[list[int]]] = []
    hits = rev.nonzero().tolist()
    by_slot: dict[int, list[list[int]]] = {}
    for s, r, c in hits:
        by_slot.setdefault(s, [[] for _ in range(b)])[r].append(slot_block[s] * length + c)
    for s, is_real in enumerate(real):
        if is_real:
            out.append(by_slot.get(s, [[] for _ in range(b)]))
    return out


def _completions(x: torch.Tensor, eos: torch.Tensor, max_new: int, per_row: bool, *, final: bool,
                 decoded: int | None = None) -> list[list[int]]:
    """Cut to ``max_new`` and trim at EOS: per row (per_row_eos) or to the longest row's first EOS + 1 when every
    row has one (upstream's batch rule)."""
    if decoded is not None:
        x = x[:, :decoded]
    rows = x[:, :max_new].tolist()
    eos_set = set(eos.tolist())
    firsts = [next((i for i, t in enumerate(r) if t in eos_set), None) for r in rows]
    if per_row:
        return [r[:f + 1] if f is not None else r for r, f in zip(rows, firsts)]
    if final and rows and all(f is not None for f in firsts):
        cut = max(f for f in firsts if f is not None) + 1
        return [r[:cut] for r in rows]
    return rows
