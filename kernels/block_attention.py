"""Block-diffusion attention over a static KV cache: the L tokens of a row's current block attend to the row's
cached prefix plus the block itself, and the block's K/V are written into the cache by the same launch.

Why: a block-diffusion decode runs three kinds of forward over one preallocated cache - the prefill (the
prompt, causal), a few denoise steps per block (the L block tokens attend bidirectionally to the prefix and to
each other) and one commit per block (the final tokens, causal, whose K/V then stay in the cache). Denoise and
commit read the whole prefix for a handful of queries, so they are bound by reading the cache, and SDPA with a
boolean mask plus GQA most likely falls back to its math backend there. This kernel reads each K/V tile once per kv-head
for all of the head's query rows, never materialises repeated K/V or a mask, and takes every per-row length
from device tensors, so one compiled kernel (and one CUDA graph) serves every step, block and prompt length.

Semantics, per row ``b`` (``start[b]`` = where the block begins, ``pad[b]`` = first valid slot):

1. ``k_cache[b, :, start[b] + j] = k_new[b, :, j]`` (and V) for ``j < L``, in place;
2. query ``i`` (slot ``start[b] + i``) attends to the prefix slots ``[pad[b], start[b])`` and to block key ``j``
   when ``j <= i`` (``causal=True``, the commit) or for every ``j`` (``causal=False``, a denoise step). A block
   key at a slot ``< pad[b]`` (only when a block overlaps the left padding) is seen by its own query alone,
   exactly as the model's mask does, so no query row is ever empty;
3. ``out = softmax(q k^T * scale) v`` over those keys; ``scale`` defaults to ``1 / sqrt(D)`` (SDPA's).

Slots outside ``[pad[b], start[b] + L)`` may hold anything (NaN included): the kernel never loads them, and the
block's keys come from ``k_new``/``v_new`` rather than the cache, so the fused write races with no read.

Layout: ``q`` [B, Hq, L, D]; ``k_new``/``v_new`` [B, Hkv, L, D]; ``k_cache``/``v_cache`` [B, Hkv, S_max, D] (any
strides: a layer's slice of a bigger cache works); ``start``/``pad`` int64 [B] on the same device;
``Hq % Hkv == 0``. Output [B, Hq, L, D] in ``q``'s dtype, laid out [B, L, Hq, D] in memory (as SDPA's output);
fp32 accumulation.

Split-KV (flash-decoding): the grid is (B * Hkv, query tiles, splits). A program holds all ``(Hq / Hkv) * L``
query rows of one kv-head (padded to a power of two >= 16 for ``tl.dot``; past 128 rows in 16-bit, 32 in fp32,
they are tiled), so each K/V tile is read once per kv-head and query tile. Row ``b``'s prefix tiles are dealt
evenly to the splits on the device (the bound comes from ``start[b]``), the last split also takes the block's
own keys and writes them to the cache; each split keeps an online softmax and writes its partial (max, sum,
unnormalised acc), and a second kernel merges the partials. A split that gets no keys writes an empty partial
(max -inf, sum 0). With one split the main kernel normalises and writes the output itself. A row whose block
does not fit the cache (``start < 0`` or ``start + L > S_max``) is skipped: no cache write, output 0 (the
reference raises instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_launchable, check_same_device, is_interpreted, next_pow2, num_sms, use_triton

__all__ = ["block_attention", "block_attention_triton", "block_attention_ref", "MAX_HEAD_DIM"]

#: Largest head dim the Triton kernel takes (the register budget of a [BLOCK_M, D] fp32 accumulator).
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Fewest prefix keys worth a split of their own, at the longest prefix the cache can hold.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 1024


@triton.jit
def _block_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, start_ptr, pad_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    H_KV, GROUP, L, S, D, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kcb, stride_kch, stride_kcs, stride_kcd,
    stride_vcb, stride_vch, stride_vcs, stride_vcd,
    stride_knb, stride_knh, stride_knl, stride_knd,
    stride_vnb, stride_vnh, stride_vnl, stride_vnd,
    stride_ob, stride_oh, stride_ol, stride_od,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program = one (row b, kv-head h) x BLOCK_M of its GROUP * L query rows x one split of the prefix.
    # UPCAST_DOT works around Triton 3.7's interpreter, whose tl.dot multiplies the raw bits of bf16 operands.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    start = tl.load(start_ptr + b).to(tl.int64)
    pad = tl.load(pad_ptr + b).to(tl.int64)
    in_range = (start >= 0) & (start + L <= S)

    # This split's share of the prefix tiles [lo, start), dealt on the device from this row's own bounds.
    lo = tl.maximum(pad, 0)
    n_prefix = tl.where(in_range, tl.maximum(start - lo, 0), 0)
    n_tiles = tl.cdiv(n_prefix, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    # Query row r = g * L + i of the tile: head h * GROUP + g, block position i.
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * L
    g = r // L
    i = r % L
    qh = h * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + i[:, None] * stride_ql + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    kc_base = k_cache_ptr + b * stride_kcb + h * stride_kch
    vc_base = v_cache_ptr + b * stride_vcb + h * stride_vch

    for t in range(t_begin, t_end):
        keys = lo + t * BLOCK_N + n_off
        k_ok = keys < start
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_base + keys[:, None] * stride_kcs + d[None, :] * stride_kcd, mask=kv_mask, other=0.0)
        v = tl.load(vc_base + keys[:, None] * stride_vcs + d[None, :] * stride_vcd, mask=kv_mask, other=0.0)
        # Online softmax in base 2 (qk_scale carries log2 e); a masked lane is set to -inf by a where, so
        # nothing it holds reaches the sums, and a running max of -inf is shifted by 0 (no -inf - -inf).
        if UPCAST_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        s = tl.where(k_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        # P is rounded to V's dtype for the second matmul, as in FlashAttention.
        p = p.to(v.dtype)
        if UPCAST_DOT:
            acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision=INPUT_PRECISION)

    if split == num_splits - 1:
        # The block's own keys, read from k_new/v_new; the first query tile also writes them to the cache.
        kn_base = k_new_ptr + b * stride_knb + h * stride_knh
        vn_base = v_new_ptr + b * stride_vnb + h * stride_vnh
        write = in_range & (pid_m == 0)
        for j0 in range(0, L, BLOCK_N):
            j = j0 + n_off
            j_ok = j < L
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(kn_base + j[:, None] * stride_knl + d[None, :] * stride_knd, mask=kv_mask, other=0.0)
            v = tl.load(vn_base + j[:, None] * stride_vnl + d[None, :] * stride_vnd, mask=kv_mask, other=0.0)
            slot = start + j
            tl.store(kc_base + slot[:, None] * stride_kcs + d[None, :] * stride_kcd, k, mask=kv_mask & write)
            tl.store(vc_base + slot[:, None] * stride_vcs + d[None, :] * stride_vcd, v, mask=kv_mask & write)
            visible = (j_ok & in_range)[None, :] & ((slot >= pad)[None, :] | (j[None, :] == i[:, None]))
            if CAUSAL:
                visible = visible & (j[None, :] <= i[:, None])
            # The same online-softmax step as above (inlined: a device-function call costs the interpreter ~30 ms).
            if UPCAST_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            p = p.to(v.dtype)
            if UPCAST_DOT:
                acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p, v, acc * alpha[:, None], input_precision=INPUT_PRECISION)

    if SPLIT:
        # Partial p = (global query row) * num_splits + split; acc rows are D wide.
        p = ((b * H_KV * GROUP + qh) * L + i) * num_splits + split
        tl.store(part_m_ptr + p, m_i, mask=row_ok)
        tl.store(part_l_ptr + p, l_i, mask=row_ok)
        tl.store(part_acc_ptr + p[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    else:
        # l_i == 0 only for a skipped row, whose acc is 0 as well.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + qh[:, None] * stride_oh + i[:, None] * stride_ol + d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _block_attention_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
    R, HQ, L, D, num_splits,
    stride_ob, stride_oh, stride_ol, stride_od,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Merge BLOCK_R query rows' partials: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rows_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (d < D)[None, :]
    m_all = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m_all = tl.maximum(m_all, tl.load(part_m_ptr + rows * num_splits + s, mask=rows_ok, other=float("-inf")))
    shift = tl.where(m_all == float("-inf"), 0.0, m_all)
    den = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for s in range(0, num_splits):
        p = rows * num_splits + s
        w = tl.exp2(tl.load(part_m_ptr + p, mask=rows_ok, other=float("-inf")) - shift)
        den += w * tl.load(part_l_ptr + p, mask=rows_ok, other=0.0)
        acc += w[:, None] * tl.load(part_acc_ptr + p[:, None] * D + d[None, :], mask=mask, other=0.0)
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    b = rows // (HQ * L)
    qh = (rows // L) % HQ
    i = rows % L
    tl.store(out_ptr + b[:, None] * stride_ob + qh[:, None] * stride_oh + i[:, None] * stride_ol
             + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_args(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                v_new: torch.Tensor, start: torch.Tensor, pad: torch.Tensor, causal: bool,
                scale: float | None) -> tuple[int, int, int, int, int, int, float]:
    """Shapes, dtypes and devices (never a device read). Returns (B, Hq, L, D, Hkv, S_max, scale)."""
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new),
             ("start", start), ("pad", pad))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    for name, t in named[:5]:
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have 4 dims, got shape {tuple(t.shape)}.")
    batch, hq, length, dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match.")
    cb, hkv, slots, cd = k_cache.shape
    if (cb, cd) != (batch, dim):
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} must be [B, Hkv, S_max, D] with B = {batch} and "
                         f"D = {dim} as in q {tuple(q.shape)}.")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (batch, hkv, length, dim):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but must be [B, Hkv, L, D] = "
                             f"{(batch, hkv, length, dim)} (q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}).")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{op}: q's {hq} heads are not a multiple of the cache's {hkv} kv-heads.")
    if length < 1 or dim < 1:
        raise ValueError(f"{op}: q must have L >= 1 block tokens and D >= 1, got shape {tuple(q.shape)}.")
    if length > slots:
        raise ValueError(f"{op}: a block of {length} tokens does not fit a cache of {slots} slots.")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: q must be float32, bfloat16 or float16, got {q.dtype}.")
    for name, t in named[1:5]:
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but q is {q.dtype}; all five must share one dtype.")
    for name, t in (("start", start), ("pad", pad)):
        if t.shape != (batch,) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{op}: {name} must be an int64 (or int32) tensor of shape [{batch}], got {t.dtype} "
                             f"{tuple(t.shape)}.")
    check_same_device(op, named)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}.")
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < float(scale) < math.inf:
        raise ValueError(f"{op}: scale must be None or a finite float > 0, got {scale!r}.")
    return batch, hq, length, dim, hkv, slots, float(scale)


def block_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    start: torch.Tensor,
    pad: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Ground truth and CPU path of :func:`block_attention`: the cache write, a boolean mask over the key span
    ``[0, max(start) + L)`` and one ``F.scaled_dot_product_attention`` call - what the model's attention computes
    (a slice assignment when all rows share one start, else an index_put; the mask of ``NLDModel._cache_mask``
    / ``_rows_mask``; no mask at all when every key is visible), so the CPU path stays bit-exact with it.

    Arguments as in :func:`block_attention`. Reads ``start``/``pad`` on the host and raises ValueError for a
    row whose block does not fit the cache or whose ``pad`` is negative.
    """
    op = "block_attention_ref"
    batch, hq, length, _, hkv, slots, _ = _check_args(op, q, k_cache, v_cache, k_new, v_new, start, pad, causal,
                                                      scale)
    starts, pads = start.tolist(), pad.tolist()
    for row, (s, p) in enumerate(zip(starts, pads)):
        if s < 0 or s + length > slots:
            raise ValueError(f"{op}: row {row}'s block slots [{s}, {s + length}) do not fit a cache of {slots} slots.")
        if p < 0:
            raise ValueError(f"{op}: row {row}'s pad is {p}; it must be >= 0.")
    if batch == 0:
        return q.new_empty(q.shape)
    dev = q.device
    if len(set(starts)) == 1:
        s = starts[0]
        k_cache[:, :, s:s + length] = k_new
        v_cache[:, :, s:s + length] = v_new
    else:
        rows = torch.arange(batch, device=dev)[:, None]
        new_slots = start.to(torch.int64)[:, None] + torch.arange(length, device=dev)
        k_cache[rows, :, new_slots] = k_new.transpose(1, 2)
        v_cache[rows, :, new_slots] = v_new.transpose(1, 2)
    span = max(starts) + length
    keys = torch.arange(span, device=dev)
    q_slots = start.to(torch.int64)[:, None, None] + torch.arange(length, device=dev)[None, :, None]  # [B, L, 1]
    if causal:
        upper = keys <= q_slots
    else:
        upper = keys < start.to(torch.int64)[:, None, None] + length
    # A block key in the left padding is seen by its own query only (the model's rule: no empty row).
    valid = (keys >= pad.to(torch.int64)[:, None, None]) | (keys == q_slots)
    mask = (valid & upper)[:, None]
    if bool(mask.all()):
        mask = None
    return F.scaled_dot_product_attention(q, k_cache[:, :, :span], v_cache[:, :, :span], attn_mask=mask,
                                          scale=scale, enable_gqa=hq != hkv)


def _plan_splits(op: str, num_splits: int | None, programs: int, slots: int, rows: int,
                 device: torch.device) -> int:
    # Enough programs for about two per SM, but no split shorter than _MIN_KEYS_PER_SPLIT keys of the longest
    # prefix, and partials (rows x D fp32 per split, written and read back) no bigger than the K/V they save.
    if num_splits is None:
        fill = triton.cdiv(2 * num_sms(device), programs)
        num_splits = max(1, min(fill, triton.cdiv(slots, _MIN_KEYS_PER_SPLIT), slots // (2 * rows), 64))
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"{op}: num_splits must be None or an int in [1, {_MAX_SPLITS}], got {num_splits!r}.")
    return num_splits


def block_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    start: torch.Tensor,
    pad: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton :func:`block_attention` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); any strides,
    head dim up to :data:`MAX_HEAD_DIM`. Never reads a device tensor on the host (safe inside a CUDA graph).
    Arguments and result as in :func:`block_attention`."""
    op = "block_attention_triton"
    batch, hq, length, dim, hkv, slots, scale = _check_args(op, q, k_cache, v_cache, k_new, v_new, start, pad,
                                                            causal, scale)
    check_launchable(_block_attention_kernel, q.device, op)
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {dim} exceeds the kernel's {MAX_HEAD_DIM}; use block_attention_ref.")
    device = q.device
    # [B, L, Hq, D] memory, like SDPA's output: the model's transpose(1, 2).reshape(B, L, Hq * D) is then free.
    out = torch.empty(batch, length, hq, dim, dtype=q.dtype, device=device).transpose(1, 2)
    if batch == 0:
        return out
    group = hq // hkv
    rows = group * length
    block_d = max(16, next_pow2(dim))
    if q.dtype == torch.float32:
        # fp32 (the parity runs) is an FMA dot: small tiles keep registers and compile time (~10 s) down.
        cap, block_n = 32, 32
    else:
        # 128 query rows x D <= 128 is the accumulator a Hopper SM holds well (a whole 32-token GQA-4 group).
        cap, block_n = (128, 64) if block_d <= 128 else (64, 32)
    block_m = min(cap, max(16, next_pow2(rows)))
    m_tiles = triton.cdiv(rows, block_m)
    num_splits = _plan_splits(op, num_splits, batch * hkv * m_tiles, slots, rows, device)
    split = num_splits > 1
    if split:
        n_parts = batch * hq * length * num_splits
        part_m = torch.empty(n_parts, dtype=torch.float32, device=device)
        part_l = torch.empty(n_parts, dtype=torch.float32, device=device)
        part_acc = torch.empty(n_parts * dim, dtype=torch.float32, device=device)
    else:
        part_m = part_l = part_acc = out
    interpreted = is_interpreted(_block_attention_kernel)
    _block_attention_kernel[(batch * hkv, m_tiles, num_splits)](
        q, k_cache, v_cache, k_new, v_new, start, pad, out, part_m, part_l, part_acc,
        hkv, group, length, slots, dim, scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(), *out.stride(),
        CAUSAL=causal, SPLIT=split, UPCAST_DOT=interpreted and q.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=8 if block_m * block_d >= 128 * 128 else 4,
    )
    if split:
        n_rows = batch * hq * length
        block_r = 16
        _block_attention_combine_kernel[(triton.cdiv(n_rows, block_r),)](
            part_m, part_l, part_acc, out, n_rows, hq, length, dim, num_splits, *out.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )
    return out


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    start: torch.Tensor,
    pad: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Write a block's K/V into one layer's static cache and attend its queries to the cached prefix + the block.

    ``q``: [B, Hq, L, D] rotated (and query-scaled) queries of the block's L tokens. ``k_new``/``v_new``:
    [B, Hkv, L, D] the block's keys/values. ``k_cache``/``v_cache``: [B, Hkv, S_max, D] this layer's cache,
    written in place at slots ``[start[b], start[b] + L)``. One float dtype for all five (float32, bfloat16,
    float16), any strides, ``Hq % Hkv == 0`` (GQA without repeating K/V). ``start``: int64 [B], where row b's
    block begins; ``pad``: int64 [B], row b's first valid slot (left padding); both on the tensors' device.
    ``causal``: False = bidirectional inside the block (a denoise step), True = block key j visible to query i
    iff j <= i (the commit). ``scale``: softmax scale (default ``1 / sqrt(D)``). ``num_splits``: prefix slices
    per (row, kv-head) for the Triton path (default: from S_max and the grid size).

    Returns [B, Hq, L, D] in q's dtype ([B, L, Hq, D] in memory, as SDPA returns it, so ``out.transpose(1, 2)``
    is contiguous). Runs the Triton kernel on CUDA (or under the interpreter) and
    :func:`block_attention_ref` otherwise; see the module docstring for the exact visibility rule.
    """
    if isinstance(q, torch.Tensor) and use_triton(_block_attention_kernel, q.device):
        return block_attention_triton(q, k_cache, v_cache, k_new, v_new, start, pad, causal=causal, scale=scale,
                                      num_splits=num_splits)
    return block_attention_ref(q, k_cache, v_cache, k_new, v_new, start, pad, causal=causal, scale=scale)
