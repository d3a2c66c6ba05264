"""Fused confidence/argmax over the vocabulary: the token each position would take and that token's
probability, in one pass over the logits and without materialising the softmax.

Semantics (the sampler contract, ``spec/sampler.md``), per row ``x`` of ``V`` logits:

- ``x0 = argmax(x)`` at ``T == 0``; at ``T > 0``, ``x0 = argmax(exp(x) / (-log u) ** T)`` in float64 (upstream's
  Gumbel-max form, a sample from ``softmax(x / T)``) with uniform noise ``u`` either injected (``noise_u``) or
  drawn in the kernel from ``(seed, offset)`` by Philox, which the reference rebuilds exactly
  (:func:`~nemotron_fast.kernels._philox.philox_uniform64_ref`);
- ``conf = softmax(x in fp32)[x0]``, the probability under the unscaled, noise-free logits, rounded to the
  logits dtype;
- ties break to the lowest index; ``exclude_id`` (the MASK id under the ``exclude_mask`` policy) is never
  chosen but still counts in the softmax denominator.

The Triton path splits each row's vocabulary over ``num_splits`` programs (so a handful of rows still fills the
GPU); every program keeps an online max / sum-exp / best key, and a second tiny kernel merges the partials.
NaN keys are treated as +inf by the kernel (torch.argmax prefers the first NaN); rows with NaN or +inf
logits are otherwise unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_launchable, next_pow2, num_sms, use_triton
from ._philox import check_seed, offset_pointer, philox_uniform64, philox_uniform64_ref

__all__ = ["confidence_argmax", "confidence_argmax_triton", "confidence_argmax_ref"]


@triton.jit(do_not_specialize=["exclude_id", "tiles_per_split", "seed"])
def _confidence_argmax_kernel(
    logits_ptr, u_ptr, offset_ptr,
    part_m_ptr, part_s_ptr, part_key_ptr, part_idx_ptr, part_logit_ptr,
    V, stride_ln, stride_lv, stride_un, stride_uv,
    temperature: tl.float64, seed: tl.int64, exclude_id, tiles_per_split,
    NOISE: tl.constexpr, UNIT_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program = one row x one slice of the vocabulary.
    # NOISE: 0 -> T == 0, 1 -> noise read from u_ptr, 2 -> Philox noise at counter offset + row * V + v, with
    # offset read from offset_ptr (a device value, so a replayed CUDA graph sees the caller's latest offset).
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    lanes = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    if NOISE == 0:
        best_key = tl.full((), float("-inf"), tl.float32)
    else:
        best_key = tl.full((), float("-inf"), tl.float64)
    best_idx = tl.full((), 2147483647, tl.int32)
    best_logit = tl.zeros((), tl.float32)
    offset = 0
    if NOISE == 2:
        offset = tl.load(offset_ptr)
    for t in range(0, tiles_per_split):
        offs = v_begin + t * BLOCK_V + lanes
        valid = offs < v_end
        x = tl.load(logits_ptr + row * stride_ln + offs * stride_lv, mask=valid, other=float("-inf")).to(tl.float32)
        # Online log-sum-exp; a running max of -inf is shifted by 0 so exp() never sees -inf - -inf.
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if NOISE == 0:
            key = x
        else:
            if NOISE == 1:
                u = tl.load(u_ptr + row * stride_un + offs * stride_uv, mask=valid, other=0.5)
            else:
                u = philox_uniform64(seed, offset + row * V + offs)
            gumbel = -tl.log(u)
            # pow(g, T) as exp(T log g): the interpreter has no libdevice pow; T == 1 divides exactly as torch.
            if UNIT_T:
                key = tl.exp(x.to(tl.float64)) / gumbel
            else:
                key = tl.exp(x.to(tl.float64)) / tl.exp(temperature * tl.log(gumbel))
        candidate = valid & (offs != exclude_id)
        key = tl.where(key != key, float("inf"), key)
        key = tl.where(candidate, key, float("-inf"))
        tile_key = tl.max(key, axis=0)
        tile_idx = tl.min(tl.where(candidate & (key == tile_key), offs, 2147483647), axis=0)
        tile_logit = tl.sum(tl.where(offs == tile_idx, x, 0.0), axis=0)
        # Tiles arrive in increasing index order, so a tie keeps the earlier (lower) index.
        take = (tile_key > best_key) | ((tile_key == best_key) & (tile_idx < best_idx))
        best_key = tl.where(take, tile_key, best_key)
        best_idx = tl.where(take, tile_idx, best_idx)
        best_logit = tl.where(take, tile_logit, best_logit)

    p = row * num_splits + split
    tl.store(part_m_ptr + p, m)
    tl.store(part_s_ptr + p, s)
    tl.store(part_key_ptr + p, best_key.to(tl.float64))
    tl.store(part_idx_ptr + p, best_idx)
    tl.store(part_logit_ptr + p, best_logit)


@triton.jit
def _confidence_argmax_combine_kernel(
    part_m_ptr, part_s_ptr, part_key_ptr, part_idx_ptr, part_logit_ptr,
    x0_ptr, conf_ptr, num_splits,
    BLOCK_S: tl.constexpr,
):
    # Merge one row's per-split partials: global max, rescaled sum-exp, lowest-index best key.
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_S)
    valid = lanes < num_splits
    p = row * num_splits + lanes
    m = tl.load(part_m_ptr + p, mask=valid, other=float("-inf"))
    s = tl.load(part_s_ptr + p, mask=valid, other=0.0)
    key = tl.load(part_key_ptr + p, mask=valid, other=float("-inf"))
    idx = tl.load(part_idx_ptr + p, mask=valid, other=2147483647)
    logit = tl.load(part_logit_ptr + p, mask=valid, other=0.0)

    m_all = tl.max(m, axis=0)
    shift = tl.where(m_all == float("-inf"), 0.0, m_all)
    s_all = tl.sum(s * tl.exp(m - shift), axis=0)
    best_key = tl.max(key, axis=0)
    best_idx = tl.min(tl.where(key == best_key, idx, 2147483647), axis=0)
    best_logit = tl.sum(tl.where(idx == best_idx, logit, 0.0), axis=0)
    conf = tl.exp(best_logit - m_all) / s_all
    tl.store(x0_ptr + row, best_idx.to(tl.int64))
    tl.store(conf_ptr + row, conf.to(conf_ptr.dtype.element_ty))


def check_sampling_args(op: str, shape: torch.Size, device: torch.device, temperature: float,
                        noise_u: torch.Tensor | None, exclude_id: int | None, seed: int | None = None,
                        offset: int | torch.Tensor = 0) -> int:
    """Validate the arguments every confidence op shares, for logits of ``shape`` [..., V] on ``device``.

    Returns the noise mode: 0 greedy, 1 injected ``noise_u``, 2 Philox noise from ``(seed, offset)``.
    """
    temperature = float(temperature)
    if not temperature >= 0.0 or temperature == float("inf"):
        raise ValueError(f"{op}: temperature must be a finite number >= 0, got {temperature}.")
    if exclude_id is not None:
        vocab = shape[-1]
        if isinstance(exclude_id, bool) or not isinstance(exclude_id, int) or not 0 <= exclude_id < vocab:
            raise ValueError(f"{op}: exclude_id must be None or an int in [0, {vocab}), got {exclude_id!r}.")
        if vocab == 1:
            raise ValueError(f"{op}: exclude_id={exclude_id} leaves no token to choose from a vocabulary of 1.")
    if temperature == 0.0:
        return 0
    if seed is not None:
        if noise_u is not None:
            raise ValueError(f"{op}: give noise_u or seed, not both.")
        check_seed(op, seed, offset, device)
        return 2
    if not isinstance(noise_u, torch.Tensor):
        raise ValueError(f"{op}: temperature {temperature} > 0 needs noise_u (uniform noise shaped like the "
                         f"logits {tuple(shape)}) or a seed for in-kernel noise.")
    if noise_u.shape != shape:
        raise ValueError(f"{op}: noise_u has shape {tuple(noise_u.shape)} but the logits have "
                         f"{tuple(shape)}; they must match.")
    if noise_u.dtype != torch.float64:
        raise TypeError(f"{op}: noise_u must be float64 (upstream draws its Gumbel noise in float64), "
                        f"got {noise_u.dtype}.")
    if noise_u.device != device:
        raise ValueError(f"{op}: noise_u is on {noise_u.device} but the logits are on {device}.")
    return 1


def seeded_noise_ref(shape: torch.Size, device: torch.device, temperature: float, noise_u: torch.Tensor | None,
                     seed: int | None, offset: int | torch.Tensor) -> torch.Tensor | None:
    """The uniform noise a call consumes: ``noise_u``, or the Philox draw of ``(seed, offset)`` (float64 of
    ``shape``), or None at ``T == 0``."""
    if temperature == 0:
        return None
    return noise_u if seed is None else philox_uniform64_ref(seed, offset, shape, device)


def _check_args(op: str, logits: torch.Tensor, temperature: float, noise_u: torch.Tensor | None,
                exclude_id: int | None, seed: int | None, offset: int | torch.Tensor) -> int:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}.")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}.")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}.")
    return check_sampling_args(op, logits.shape, logits.device, temperature, noise_u, exclude_id, seed, offset)


def plan_splits(op: str, n_tiles: int, row_programs: int, device: torch.device,
                num_splits: int | None) -> tuple[int, int]:
    """How many slices each row's ``n_tiles`` vocabulary tiles are cut into: ``(num_splits, tiles_per_split)``.

    By default enough slices for about two programs per SM; never an empty slice.
    """
    if num_splits is None:
        num_splits = max(1, min(n_tiles, triton.cdiv(2 * num_sms(device), row_programs)))
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{op}: num_splits must be an int >= 1, got {num_splits!r}.")
    tiles_per_split = triton.cdiv(n_tiles, min(num_splits, n_tiles))
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def alloc_partials(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-(row, slice) partial state: max fp32, sum-exp fp32, best key fp64, best index int32, its logit fp32."""
    return (torch.empty(size, dtype=torch.float32, device=device),
            torch.empty(size, dtype=torch.float32, device=device),
            torch.empty(size, dtype=torch.float64, device=device),
            torch.empty(size, dtype=torch.int32, device=device),
            torch.empty(size, dtype=torch.float32, device=device))


def combine_partials(parts: tuple[torch.Tensor, ...], num_splits: int, x0: torch.Tensor, conf: torch.Tensor) -> None:
    """Merge the partials of ``x0.numel()`` rows into ``x0`` [N] int64 and ``conf`` [N] (logits dtype)."""
    _confidence_argmax_combine_kernel[(x0.numel(),)](
        *parts, x0, conf, num_splits, BLOCK_S=next_pow2(num_splits), num_warps=1,
    )


def gumbel_key_ref(logits: torch.Tensor, temperature: float, noise_u: torch.Tensor) -> torch.Tensor:
    """Upstream's perturbed logits ``exp(x) / (-log u) ** T`` in float64.

    ``logits``: [..., V] float; ``noise_u``: [..., V] float64 in (0, 1). Returns [..., V] float64.
    """
    return logits.to(torch.float64).exp() / (-torch.log(noise_u)) ** temperature


def confidence_argmax_ref(
    logits: torch.Tensor,
    temperature: float = 0.0,
    noise_u: torch.Tensor | None = None,
    exclude_id: int | None = None,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth and CPU path of :func:`confidence_argmax` in plain torch (materialises the softmax).

    Arguments as in :func:`confidence_argmax`. Returns ``x0`` [...] int64 and ``conf`` [...] in ``logits.dtype``.
    """
    _check_args("confidence_argmax_ref", logits, temperature, noise_u, exclude_id, seed, offset)
    noise_u = seeded_noise_ref(logits.shape, logits.device, temperature, noise_u, seed, offset)
    key = logits if temperature == 0 else gumbel_key_ref(logits, temperature, noise_u)
    if exclude_id is not None:
        key = key.clone()
        key[..., exclude_id] = float("-inf")
    x0 = key.argmax(dim=-1)
    if exclude_id is not None:
        # Only an all -inf row lands on the excluded id; the lowest other index is the tie-break answer.
        x0 = torch.where(x0 == exclude_id, 1 if exclude_id == 0 else 0, x0)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    conf = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1).to(logits.dtype)
    return x0, conf


def confidence_argmax_triton(
    logits: torch.Tensor,
    temperature: float = 0.0,
    noise_u: torch.Tensor | None = None,
    exclude_id: int | None = None,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
    num_splits: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`confidence_argmax` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Arguments as in :func:`confidence_argmax`, plus ``num_splits`` (vocabulary slices per row) and ``block_v``
    (tile width, a power of two), which default to a heuristic. Any strides. Returns ``x0`` [...] int64 and
    ``conf`` [...] in ``logits.dtype``.
    """
    op = "confidence_argmax_triton"
    noise = _check_args(op, logits, temperature, noise_u, exclude_id, seed, offset)
    check_launchable(_confidence_argmax_kernel, logits.device, op)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    l2 = logits.reshape(-1, vocab)
    n_rows = l2.shape[0]
    device = logits.device
    x0 = torch.empty(n_rows, dtype=torch.int64, device=device)
    conf = torch.empty(n_rows, dtype=logits.dtype, device=device)
    if n_rows == 0:
        return x0.reshape(lead), conf.reshape(lead)

    temperature = float(temperature)
    u2 = noise_u.reshape(-1, vocab) if noise == 1 else l2
    if block_v is None:
        block_v = min(next_pow2(vocab), 4096)
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"{op}: block_v must be a power of two, got {block_v}.")
    num_splits, tiles_per_split = plan_splits(op, triton.cdiv(vocab, block_v), n_rows, device, num_splits)
    parts = alloc_partials(n_rows * num_splits, device)
    off = offset_pointer(offset, device) if noise == 2 else x0
    _confidence_argmax_kernel[(n_rows, num_splits)](
        l2, u2, off, *parts,
        vocab, l2.stride(0), l2.stride(1), u2.stride(0), u2.stride(1),
        temperature, seed or 0, -1 if exclude_id is None else exclude_id, tiles_per_split,
        NOISE=noise, UNIT_T=temperature == 1.0, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    combine_partials(parts, num_splits, x0, conf)
    return x0.reshape(lead), conf.reshape(lead)


def confidence_argmax(
    logits: torch.Tensor,
    temperature: float = 0.0,
    noise_u: torch.Tensor | None = None,
    exclude_id: int | None = None,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice and its confidence for every row of ``logits``, without materialising the softmax.

    ``logits``: [..., V] float32/bfloat16/float16. ``temperature``: 0 = greedy; > 0 = Gumbel-max with uniform
    noise, either ``noise_u`` [..., V] float64 or, with ``seed`` (int in [0, 2**63)), Philox noise drawn in the
    kernel for counters ``offset + flat index`` (advance ``offset`` by ``logits.numel()`` between calls;
    ``offset`` may be an int64 one-element tensor on the logits' device, read at launch).
    ``exclude_id``: a token id never chosen (default None). Returns ``x0`` [...] int64 and ``conf`` [...] in
    ``logits.dtype`` (``softmax(logits)[x0]``). Runs the Triton kernel on CUDA (or under the interpreter)
    and :func:`confidence_argmax_ref` otherwise.
    """
    if isinstance(logits, torch.Tensor) and use_triton(_confidence_argmax_kernel, logits.device):
        return confidence_argmax_triton(logits, temperature, noise_u, exclude_id, seed=seed, offset=offset)
    return confidence_argmax_ref(logits, temperature, noise_u, exclude_id, seed=seed, offset=offset)
