"""Write a block's keys or values into the preallocated KV cache at a slot offset, in one launch.

``cache[b, :, start_b : start_b + L] = new[b]`` for every row ``b``. ``start`` is one int for the whole batch
(checked on the host) or an int64 tensor [B] already on the device (never read back, so the write costs no
host synchronisation; slots outside ``[0, S)`` are skipped by the kernel, while the reference raises).
It is its own op so that the commit's cache write is a single launch that can later be fused.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_launchable, check_same_device, next_pow2, use_triton

__all__ = ["kv_write", "kv_write_triton", "kv_write_ref"]


@triton.jit(do_not_specialize=["start"])
def _kv_write_kernel(
    cache_ptr, new_ptr, start_ptr,
    H, S, L, D, start,
    stride_cb, stride_ch, stride_cs, stride_cd, stride_nb, stride_nh, stride_nl, stride_nd,
    PER_ROW_START: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program = one (row, head) x BLOCK_L positions x the whole head dim.
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    if PER_ROW_START:
        first = tl.load(start_ptr + b)
    else:
        first = start
    slot = first + pos
    ok = (pos < L)[:, None] & (d < D)[None, :]
    vals = tl.load(new_ptr + b * stride_nb + h * stride_nh + pos[:, None] * stride_nl + d[None, :] * stride_nd,
                   mask=ok, other=0.0)
    in_cache = ((slot >= 0) & (slot < S))[:, None]
    tl.store(cache_ptr + b * stride_cb + h * stride_ch + slot[:, None].to(tl.int64) * stride_cs
             + d[None, :] * stride_cd, vals, mask=ok & in_cache)


def _check_args(op: str, cache: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor) -> None:
    for name, t in (("cache", cache), ("new", new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have 4 dims [B, H, *, D], got {tuple(t.shape)}.")
    (b, h, s, d), (nb, nh, length, nd) = cache.shape, new.shape
    if (b, h, d) != (nb, nh, nd):
        raise ValueError(f"{op}: new {tuple(new.shape)} must match cache {tuple(cache.shape)} in B, H and D.")
    if not cache.dtype.is_floating_point or new.dtype != cache.dtype:
        raise TypeError(f"{op}: cache and new must share one float dtype, got {cache.dtype} and {new.dtype}.")
    if isinstance(start, torch.Tensor):
        if start.shape != (b,) or start.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{op}: a tensor start must be int64 or int32 of shape [{b}], got {start.dtype} "
                             f"{tuple(start.shape)}.")
        check_same_device(op, [("cache", cache), ("new", new), ("start", start)])
    else:
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"{op}: start must be an int or an int tensor [B], got {type(start).__name__}.")
        if start < 0 or start + length > s:
            raise ValueError(f"{op}: slots [{start}, {start + length}) do not fit a cache of {s} slots.")
        check_same_device(op, [("cache", cache), ("new", new)])


def kv_write_ref(cache: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Ground truth and CPU path of :func:`kv_write`: a slice assignment (an index_put for per-row starts).

    ``cache``: [B, H, S, D], ``new``: [B, H, L, D], one float dtype; ``start``: int or int64 [B].
    Returns ``cache``, written in place.
    """
    _check_args("kv_write_ref", cache, new, start)
    length = new.shape[2]
    if not isinstance(start, torch.Tensor):
        cache[:, :, start:start + length] = new
        return cache
    batch, heads = cache.shape[:2]
    slots = start.to(torch.int64)[:, None] + torch.arange(length, device=cache.device)
    rows = torch.arange(batch, device=cache.device)[:, None, None]
    head_idx = torch.arange(heads, device=cache.device)[None, :, None]
    cache[rows, head_idx, slots[:, None, :]] = new
    return cache


def kv_write_triton(cache: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Triton :func:`kv_write` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); any strides.
    Arguments as in :func:`kv_write`; returns ``cache``."""
    op = "kv_write_triton"
    _check_args(op, cache, new, start)
    check_launchable(_kv_write_kernel, cache.device, op)
    batch, heads, slots, dim = cache.shape
    length = new.shape[2]
    if new.numel() == 0:
        return cache
    per_row = isinstance(start, torch.Tensor)
    block_d = next_pow2(dim)
    block_l = max(1, min(next_pow2(length), 4096 // block_d))
    _kv_write_kernel[(batch * heads, triton.cdiv(length, block_l))](
        cache, new, start if per_row else cache,
        heads, slots, length, dim, 0 if per_row else start,
        *cache.stride(), *new.stride(),
        PER_ROW_START=per_row, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4,
    )
    return cache


def kv_write(cache: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Write ``new`` into ``cache`` at slots ``[start_b, start_b + L)`` of every row, in place.

    ``cache``: [B, H, S, D] and ``new``: [B, H, L, D], one float dtype, any strides. ``start``: int (same
    for all rows) or int64/int32 [B] on the cache's device. Returns ``cache``. Runs the Triton kernel on CUDA
    (or under the interpreter) and :func:`kv_write_ref` otherwise.
    """
    fn = kv_write_triton if use_triton(_kv_write_kernel, cache.device) else kv_write_ref
    return fn(cache, new, start)
