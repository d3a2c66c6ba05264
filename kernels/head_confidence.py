"""The output head fused with :mod:`confidence`: ``logits = hidden @ weight.T`` computed tile by tile and reduced
to the chosen token and its confidence, so the [N, V] logits are never written (at V = 131072 that is the
biggest activation of a denoise step).

Each vocabulary tile of logits is accumulated in fp32 and rounded to the weight dtype before it is reduced,
which is what ``F.linear`` outputs, so the semantics are exactly ``confidence_argmax(F.linear(hidden,
weight))``. Only the summation order of the dot products differs from the unfused path; the tests pin
discrete outputs on data whose dot products are exact in any order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_launchable, is_interpreted, next_pow2, use_triton
from ._philox import offset_pointer, offset_value, philox_uniform64, philox_uniform64_at
from .confidence import (
    alloc_partials,
    check_sampling_args,
    combine_partials,
    gumbel_key_ref,
    plan_splits,
)

__all__ = ["head_confidence_argmax", "head_confidence_argmax_triton", "head_confidence_argmax_ref", "first_argmax"]


@triton.jit(do_not_specialize=["exclude_id", "v_per_split", "seed"])
def _head_confidence_argmax_kernel(
    hidden_ptr, weight_ptr, u_ptr, offset_ptr,
    part_m_ptr, part_s_ptr, part_key_ptr, part_idx_ptr, part_logit_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, stride_un, stride_uv,
    temperature: tl.float64, seed: tl.int64, exclude_id, v_per_split,
    NOISE: tl.constexpr, UNIT_T: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program = BLOCK_N rows x one slice of v_per_split vocabulary entries (a multiple of BLOCK_V, so the
    # slices do not depend on the tile width the autotuner picks).
    # NOISE: 0 -> T == 0, 1 -> noise read from u_ptr, 2 -> Philox noise at counter offset + row * V + v, with
    # offset read from offset_ptr (a device value, so a replayed CUDA graph sees the caller's latest offset).
    # UPCAST_DOT works around Triton 3.7's interpreter, whose tl.dot multiplies the raw bits of bf16 operands;
    # bf16 x bf16 products are exact in fp32, so the upcast dot computes the same sums.
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    v_begin = split * v_per_split
    v_end = tl.minimum(V, v_begin + v_per_split)
    lanes = tl.arange(0, BLOCK_V)
    ks0 = tl.arange(0, BLOCK_K)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    if NOISE == 0:
        best_key = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    else:
        best_key = tl.full((BLOCK_N,), float("-inf"), tl.float64)
    best_idx = tl.full((BLOCK_N,), 2147483647, tl.int32)
    best_logit = tl.zeros((BLOCK_N,), tl.float32)
    offset = 0
    if NOISE == 2:
        offset = tl.load(offset_ptr)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs = v0 + lanes
        valid = offs < v_end
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + ks0
            k_ok = ks < H
            h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weight_ptr + offs[None, :].to(tl.int64) * stride_wv + ks[:, None] * stride_wh,
                        mask=valid[None, :] & k_ok[:, None], other=0.0)
            if UPCAST_DOT:
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
        # Round like F.linear's output before anything reads the logits.
        x = acc.to(weight_ptr.dtype.element_ty).to(tl.float32)
        x = tl.where(valid[None, :], x, float("-inf"))

        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
        if NOISE == 0:
            key = x
        else:
            if NOISE == 1:
                u = tl.load(u_ptr + rows[:, None] * stride_un + offs[None, :] * stride_uv,
                            mask=row_ok[:, None] & valid[None, :], other=0.5)
            else:
                u = philox_uniform64(seed, offset + rows[:, None] * V + offs[None, :])
            gumbel = -tl.log(u)
            if UNIT_T:
                key = tl.exp(x.to(tl.float64)) / gumbel
            else:
                key = tl.exp(x.to(tl.float64)) / tl.exp(temperature * tl.log(gumbel))
        candidate = valid[None, :] & (offs[None, :] != exclude_id)
        key = tl.where(key != key, float("inf"), key)
        key = tl.where(candidate, key, float("-inf"))
        tile_key = tl.max(key, axis=1)
        tile_idx = tl.min(tl.where(candidate & (key == tile_key[:, None]), offs[None, :], 2147483647), axis=1)
        tile_logit = tl.sum(tl.where(offs[None, :] == tile_idx[:, None], x, 0.0), axis=1)
        # Tiles arrive in increasing index order, so a tie keeps the earlier (lower) index.
        take = (tile_key > best_key) | ((tile_key == best_key) & (tile_idx < best_idx))
        best_key = tl.where(take, tile_key, best_key)
        best_idx = tl.where(take, tile_idx, best_idx)
        best_logit = tl.where(take, tile_logit, best_logit)

    p = rows * num_splits + split
    tl.store(part_m_ptr + p, m, mask=row_ok)
    tl.store(part_s_ptr + p, s, mask=row_ok)
    tl.store(part_key_ptr + p, best_key.to(tl.float64), mask=row_ok)
    tl.store(part_idx_ptr + p, best_idx, mask=row_ok)
    tl.store(part_logit_ptr + p, best_logit, mask=row_ok)


def _check_args(op: str, hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                noise_u: torch.Tensor | None, exclude_id: int | None, seed: int | None,
                offset: int | torch.Tensor) -> tuple[torch.Size, int]:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must have shape [V, H] with V, H >= 1, got {tuple(weight.shape)}.")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden must have shape [..., H] with H = {weight.shape[1]} (weight's), got "
                         f"{tuple(hidden.shape)}.")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: weight must be float32, bfloat16 or float16, got {weight.dtype}.")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; they must match.")
    if hidden.device != weight.device:
        raise ValueError(f"{op}: hidden is on {hidden.device} but weight is on {weight.device}.")
    shape = torch.Size((*hidden.shape[:-1], weight.shape[0]))
    return shape, check_sampling_args(op, shape, weight.device, temperature, noise_u, exclude_id, seed, offset)


# Upper bound on one row chunk's logits in the CPU path (see head_confidence_argmax_ref).
CPU_CHUNK_BYTES = 64 << 20
# Width of the vocabulary segments first_argmax scans with a plain max before locating the index.
_SEGMENT = 1024


def first_argmax(key: torch.Tensor) -> torch.Tensor:
    """``key.argmax(-1)`` (lowest index among equal maxima) for ``key`` [N, V], computed as a vectorised max over
    1024-wide segments, then an index search inside the first segment holding the row maximum only. On a CPU
    torch's argmax kernel is about ten times slower than this (it carries an index through the whole scan).
    Returns int64 [N]."""
    n, v = key.shape
    segs = -(-v // _SEGMENT)
    if segs * _SEGMENT != v:
        key = F.pad(key, (0, segs * _SEGMENT - v), value=float("-inf"))
    view = key.reshape(n, segs, _SEGMENT)
    seg_max = view.amax(-1)
    row_max = seg_max.amax(-1, keepdim=True)
    # NaN rows fall back to torch's own argmax, which reports the first NaN
    first_seg = (seg_max == row_max).to(torch.uint8).argmax(-1)
    inner = view[torch.arange(n, device=key.device), first_seg].argmax(-1)
    idx = first_seg * _SEGMENT + inner
    nan_rows = torch.isnan(row_max.squeeze(-1))
    if bool(nan_rows.any()):
        idx = torch.where(nan_rows, key.argmax(-1), idx)
    return idx


def head_confidence_argmax_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 0.0,
    noise_u: torch.Tensor | None = None,
    exclude_id: int | None = None,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and CPU fast path of :func:`head_confidence_argmax`, in plain torch: per chunk of rows,
    ``F.linear`` then the choice (:func:`first_argmax` of the logits or of the Gumbel keys) and the confidence
    from torch's fused softmax kernel, in the logits dtype exactly as the reference sampler computes it.

    On a CPU this beats an online max / sum-exp over vocabulary tiles: torch's softmax is one vectorised pass,
    where the online form needs several passes per tile plus a thread barrier each. Arguments as in
    :func:`head_confidence_argmax`; ``chunk``: rows per ``F.linear`` (default: as many as keep one chunk's
    logits within ``CPU_CHUNK_BYTES``). Returns ``x0`` [...] int64 and ``conf`` [...] in ``weight.dtype``.
    """
    shape, noise = _check_args("head_confidence_argmax_ref", hidden, weight, temperature, noise_u, exclude_id,
                               seed, offset)
    lead, vocab = shape[:-1], shape[-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    if chunk is None:
        chunk = max(1, CPU_CHUNK_BYTES // (8 * vocab))
    if chunk < 1:
        raise ValueError(f"head_confidence_argmax_ref: chunk must be >= 1, got {chunk}.")
    u2 = noise_u.reshape(-1, vocab) if noise == 1 else None
    x0 = torch.empty(n, dtype=torch.int64, device=hidden.device)
    conf = torch.empty(n, dtype=weight.dtype, device=hidden.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        logits = F.linear(h2[r0:r1], weight)
        if noise == 0:
            key = logits
        else:
            if noise == 1:
                u = u2[r0:r1]
            else:
                # the kernel's counters: offset + row * V + v
                rows = torch.arange(r0, r1, dtype=torch.int64, device=weight.device)[:, None] * vocab
                u = philox_uniform64_at(seed, offset_value(offset) + rows + torch.arange(vocab, device=weight.device))
            key = gumbel_key_ref(logits, temperature, u)
        if exclude_id is not None:
            key = key.clone() if key is logits else key
            key[:, exclude_id] = float("-inf")
        idx = first_argmax(key)
        if exclude_id is not None:
            # only an all -inf row lands on the excluded id; the lowest other index is the tie-break answer
            idx = torch.where(idx == exclude_id, 1 if exclude_id == 0 else 0, idx)
        x0[r0:r1] = idx
        conf[r0:r1] = torch.softmax(logits, dim=-1).gather(1, idx[:, None]).squeeze(1)
    return x0.reshape(lead), conf.reshape(lead)


# Launch configurations the CUDA path tunes over, per (N, V, H, NOISE) and dtype. Every BLOCK_V divides
# _SPLIT_QUANTUM, so the vocabulary slices (and the partial buffers) do not depend on the config chosen.
_SPLIT_QUANTUM = 256
_TUNE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bv, bk, w, st in (
        (16, 128, 128, 4, 4), (16, 256, 64, 4, 3), (16, 64, 128, 4, 4),
        (32, 128, 64, 4, 4), (32, 128, 128, 8, 3), (32, 256, 64, 8, 3),
        (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
    )
]


def _prune_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    # Row tiles much taller than the batch of rows only burn registers; keep the smallest one at least.
    limit = max(16, next_pow2(int(named_args["N"])))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_head_confidence_argmax_tuned = triton.autotune(
    configs=_TUNE_CONFIGS, key=["N", "V", "H", "NOISE"], prune_configs_by={"early_config_prune": _prune_configs},
)(_head_confidence_argmax_kernel)


def head_confidence_argmax_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 0.0,
    noise_u: torch.Tensor | None = None,
    exclude_id: int | None = None,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`head_confidence_argmax` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Arguments as in :func:`head_confidence_argmax` (any strides), plus tile sizes (powers of two >= 16) and
    ``num_splits`` (vocabulary slices per row). On CUDA with no tile size given, the tiles, ``num_warps`` and
    ``num_stages`` are autotuned per (rows, V, H, noise mode, dtype): the first call of a shape benchmarks the
    candidates, so make it outside any CUDA-graph capture. The interpreter, or any tile size given, runs one
    fixed config (unset tiles default to a heuristic). Returns ``x0`` [...] int64 and ``conf`` [...] in
    ``weight.dtype``.
    """
    op = "head_confidence_argmax_triton"
    shape, noise = _check_args(op, hidden, weight, temperature, noise_u, exclude_id, seed, offset)
    check_launchable(_head_confidence_argmax_kernel, weight.device, op)
    lead, vocab = shape[:-1], shape[-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n_rows, width = h2.shape
    device = weight.device
    x0 = torch.empty(n_rows, dtype=torch.int64, device=device)
    conf = torch.empty(n_rows, dtype=weight.dtype, device=device)
    if n_rows == 0:
        return x0.reshape(lead), conf.reshape(lead)

    temperature = float(temperature)
    u2 = noise_u.reshape(-1, vocab) if noise == 1 else h2
    off = offset_pointer(offset, device) if noise == 2 else x0
    interpreted = is_interpreted(_head_confidence_argmax_kernel)
    tuned = not interpreted and block_n is None and block_v is None and block_k is None
    nominal_n = block_n or min(64, max(16, next_pow2(n_rows)))
    if not tuned:
        block_n = nominal_n
        block_v = block_v or 128
        block_k = block_k or min(64, max(16, next_pow2(width)))
        for name, b in (("block_n", block_n), ("block_v", block_v), ("block_k", block_k)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"{op}: {name} must be a power of two >= 16 (tl.dot's minimum), got {b}.")
    quantum = _SPLIT_QUANTUM if tuned else block_v
    num_splits, tiles_per_split = plan_splits(op, triton.cdiv(vocab, quantum), triton.cdiv(n_rows, nominal_n), device,
                                              num_splits)
    parts = alloc_partials(n_rows * num_splits, device)
    args = (h2, weight, u2, off, *parts,
            n_rows, vocab, width, h2.stride(0), h2.stride(1), weight.stride(0), weight.stride(1),
            u2.stride(0), u2.stride(1),
            temperature, seed or 0, -1 if exclude_id is None else exclude_id, tiles_per_split * quantum)
    modes = dict(NOISE=noise, UNIT_T=temperature == 1.0,
                 INPUT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
                 UPCAST_DOT=weight.dtype == torch.bfloat16 and interpreted)
    if tuned:
        _head_confidence_argmax_tuned[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), num_splits)](*args, **modes)
    else:
        _head_confidence_argmax_kernel[(triton.cdiv(n_rows, block_n), num_splits)](
            *args, **modes, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=4,
        )
    combine_partials(parts, num_splits, x0, conf)
    return x0.reshape(lead), conf.reshape(lead)


def head_confidence_argmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 0.0,
    noise_u: torch.Tensor | None = None,
    exclude_id: int | None = None,
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``confidence_argmax(F.linear(hidden, weight), ...)`` without writing the logits.

    ``hidden``: [..., H] and ``weight``: [V, H] (the bias-free output head), one float dtype.
    ``temperature``: 0 = greedy; > 0 = Gumbel-max with uniform noise, either ``noise_u`` [..., V] float64 or,
    with ``seed`` (int in [0, 2**63)), Philox noise drawn in the kernel for counters ``offset + flat index``
    of the [..., V] logits (:func:`~nemotron_fast.kernels.philox_uniform64_ref` rebuilds it). ``offset`` is an
    int or an int64 one-element tensor on the weight's device, read at launch: advance it in place by
    ``hidden rows * V`` after each call and a captured CUDA graph draws fresh noise on every replay.
    ``exclude_id``: a token id never chosen (default None). Returns ``x0`` [...]
    int64 and ``conf`` [...] in ``weight.dtype``. Runs the Triton kernel on CUDA (or under the interpreter)
    and the chunked :func:`head_confidence_argmax_ref` otherwise.
    """
    if isinstance(weight, torch.Tensor) and use_triton(_head_confidence_argmax_kernel, weight.device):
        return head_confidence_argmax_triton(hidden, weight, temperature, noise_u, exclude_id, seed=seed,
                                             offset=offset)
    return head_confidence_argmax_ref(hidden, weight, temperature, noise_u, exclude_id, seed=seed, offset=offset)
