"""The select/unmask step of one denoise step: which masked positions of each row are revealed, written into the
block in place. One launch per step and no host synchronisation, so the denoise loop never waits on the GPU.

Per active row, only masked positions are candidates, ranked by confidence (descending) with ties to the
lowest position, i.e. a stable descending sort; upstream's ``torch.topk`` leaves the tie order unspecified.

- ``force_all`` (the ``finish_last_step`` policy): every candidate is revealed;
- ``threshold`` given: the top-ranked candidate is always revealed, every other one iff ``conf >= threshold``
  with the threshold first rounded to ``conf.dtype`` and the comparison made in that dtype (bf16(0.9) =
  0.8984375, as in upstream's bf16 comparison);
- ``threshold=None``: the ``min(k[b], n_masked)`` top-ranked candidates are revealed.

A revealed position gets ``block = x0`` and ``is_mask = False``. NaN confidences are unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_launchable, check_same_device, next_pow2, use_triton

__all__ = ["select_unmask", "select_unmask_triton", "select_unmask_ref", "round_threshold"]

_MODE_THRESHOLD, _MODE_TOPK, _MODE_ALL = 0, 1, 2


@triton.jit
def _select_unmask_kernel(
    x0_ptr, conf_ptr, block_ptr, is_mask_ptr, k_ptr, active_ptr, revealed_ptr,
    L, stride_xb, stride_xl, stride_cb, stride_cl, stride_bb, stride_bl, stride_mb, stride_ml,
    threshold,
    MODE: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # One program per row. A position's rank (candidates ahead of it) is counted against BLOCK_J positions at
    # a time: a [BLOCK_L, BLOCK_J] comparison tile, one tile in all for the usual 32-token block.
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_L)
    ok = pos < L
    row_active = True
    if HAS_ACTIVE:
        row_active = tl.load(active_ptr + b) != 0
    cand = (tl.load(is_mask_ptr + b * stride_mb + pos * stride_ml, mask=ok, other=0) != 0) & row_active
    if MODE == 2:
        reveal = cand
    else:
        conf = tl.load(conf_ptr + b * stride_cb + pos * stride_cl, mask=ok, other=float("-inf")).to(tl.float32)
        rank = tl.zeros((BLOCK_L,), tl.int32)
        for j0 in range(0, L, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < L
            c_j = tl.load(conf_ptr + b * stride_cb + j * stride_cl, mask=j_ok, other=float("-inf")).to(tl.float32)
            cand_j = (tl.load(is_mask_ptr + b * stride_mb + j * stride_ml, mask=j_ok, other=0) != 0) & row_active
            # Candidate j outranks i when it is more confident, or as confident and earlier.
            ahead = (c_j[None, :] > conf[:, None]) | ((c_j[None, :] == conf[:, None]) & (j[None, :] < pos[:, None]))
            rank += tl.sum((cand_j[None, :] & ahead).to(tl.int32), axis=1)
        if MODE == 0:
            # conf and threshold are both exact in fp32, so this is the comparison in conf's dtype.
            reveal = cand & ((rank == 0) | (conf >= threshold))
        else:
            reveal = cand & (rank < tl.load(k_ptr + b))
    # Every read of is_mask above happens before these writes.
    x0 = tl.load(x0_ptr + b * stride_xb + pos * stride_xl, mask=ok & reveal, other=0)
    tl.store(block_ptr + b * stride_bb + pos * stride_bl, x0, mask=ok & reveal)
    tl.store(is_mask_ptr + b * stride_mb + pos * stride_ml, tl.zeros((BLOCK_L,), tl.int1), mask=ok & reveal)
    tl.store(revealed_ptr + b * L + pos, reveal, mask=ok)


def round_threshold(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype`` as torch rounds a Python scalar compared with a tensor of that dtype
    (``round_threshold(0.9, torch.bfloat16) == 0.8984375``). Host-only: no device is touched."""
    return torch.tensor(float(threshold), dtype=dtype).item()


def _check_args(op: str, x0: torch.Tensor, conf: torch.Tensor, block: torch.Tensor, is_mask: torch.Tensor,
                threshold: float | None, k: torch.Tensor | None, active: torch.Tensor | None,
                force_all: bool) -> None:
    named = (("x0", x0), ("conf", conf), ("block", block), ("is_mask", is_mask), ("k", k), ("active", active))
    for name, t in named:
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if x0.dim() != 2:
        raise ValueError(f"{op}: x0 must have shape [B, L], got {tuple(x0.shape)}.")
    for name, t in named[1:4]:
        if t.shape != x0.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x0 has {tuple(x0.shape)}; "
                             f"they must match.")
    for name, t in (("x0", x0), ("block", block)):
        if t.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64 token ids, got {t.dtype}.")
    if conf.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: conf must be float32, bfloat16 or float16, got {conf.dtype}.")
    if is_mask.dtype != torch.bool:
        raise TypeError(f"{op}: is_mask must be bool, got {is_mask.dtype}.")
    batch = x0.shape[0]
    if active is not None and (active.shape != (batch,) or active.dtype != torch.bool):
        raise ValueError(f"{op}: active must be a bool tensor of shape [{batch}], got {active.dtype} "
                         f"{tuple(active.shape)}.")
    if threshold is None and not force_all:
        if k is None:
            raise ValueError(f"{op}: threshold=None needs k, the number of tokens to reveal per row.")
        if k.shape != (batch,) or k.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{op}: k must be an int64 or int32 tensor of shape [{batch}], got {k.dtype} "
                             f"{tuple(k.shape)}.")
    if threshold is not None and not -float("inf") < float(threshold) < float("inf"):
        raise ValueError(f"{op}: threshold must be a finite number or None, got {threshold}.")
    check_same_device(op, named)


def select_unmask_ref(
    x0: torch.Tensor,
    conf: torch.Tensor,
    block: torch.Tensor,
    is_mask: torch.Tensor,
    *,
    threshold: float | None,
    k: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    force_all: bool = False,
) -> torch.Tensor:
    """Ground truth and CPU path of :func:`select_unmask`, vectorised over rows (two stable sorts, no host
    synchronisation, so it is also sync-free on CUDA tensors). Arguments as in :func:`select_unmask`."""
    _check_args("select_unmask_ref", x0, conf, block, is_mask, threshold, k, active, force_all)
    cand = is_mask if active is None else is_mask & active[:, None]
    if force_all:
        reveal = cand.clone()
    else:
        # Stable sort by confidence, then a stable sort that moves candidates ahead of everything else.
        order = torch.sort(conf, dim=1, descending=True, stable=True).indices
        order = order.gather(1, torch.sort((~cand).gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
        steps = torch.arange(conf.shape[1], device=conf.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, steps)
        if threshold is None:
            reveal = cand & (rank < k[:, None])
        else:
            reveal = cand & ((rank == 0) | (conf >= round_threshold(threshold, conf.dtype)))
    block.copy_(torch.where(reveal, x0, block))
    is_mask.logical_and_(~reveal)
    return reveal


def select_unmask_triton(
    x0: torch.Tensor,
    conf: torch.Tensor,
    block: torch.Tensor,
    is_mask: torch.Tensor,
    *,
    threshold: float | None,
    k: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    force_all: bool = False,
    block_j: int | None = None,
) -> torch.Tensor:
    """Triton :func:`select_unmask` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); one program per
    row. Arguments as in :func:`select_unmask`; ``block_j`` (a power of two) is the rank loop's step."""
    op = "select_unmask_triton"
    _check_args(op, x0, conf, block, is_mask, threshold, k, active, force_all)
    check_launchable(_select_unmask_kernel, x0.device, op)
    batch, length = x0.shape
    revealed = torch.empty((batch, length), dtype=torch.bool, device=x0.device)
    if batch == 0 or length == 0:
        return revealed
    mode = _MODE_ALL if force_all else (_MODE_TOPK if threshold is None else _MODE_THRESHOLD)
    thr = round_threshold(threshold, conf.dtype) if mode == _MODE_THRESHOLD else 0.0
    block_l = next_pow2(length)
    # At most 4096 comparisons per step of the rank loop; 32-token blocks rank in a single step.
    block_j = block_j or max(1, min(block_l, 4096 // block_l))
    if block_j < 1 or block_j & (block_j - 1):
        raise ValueError(f"{op}: block_j must be a power of two, got {block_j}.")
    _select_unmask_kernel[(batch,)](
        x0, conf, block, is_mask, k if mode == _MODE_TOPK else x0, x0 if active is None else active, revealed,
        length, x0.stride(0), x0.stride(1), conf.stride(0), conf.stride(1), block.stride(0), block.stride(1),
        is_mask.stride(0), is_mask.stride(1), thr,
        MODE=mode, HAS_ACTIVE=active is not None, BLOCK_L=block_l, BLOCK_J=block_j,
        num_warps=max(1, min(8, block_l * block_j // 1024)),
    )
    return revealed


def select_unmask(
    x0: torch.Tensor,
    conf: torch.Tensor,
    block: torch.Tensor,
    is_mask: torch.Tensor,
    *,
    threshold: float | None,
    k: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    force_all: bool = False,
) -> torch.Tensor:
    """Reveal this step's tokens of every row, in place; see the module docstring for the rule.

    ``x0``: [B, L] int64 proposed tokens. ``conf``: [B, L] float32/bfloat16/float16 confidences (values at
    unmasked positions are ignored). ``block``: [B, L] int64 current tokens, updated in place. ``is_mask``:
    [B, L] bool, updated in place. ``threshold``: float, or None to reveal ``k`` [B] (int64/int32) tokens per
    row. ``active``: [B] bool, rows that take part (default all). ``force_all``: reveal every mask (overrides
    ``threshold`` and ``k``). Any strides. Returns ``revealed`` [B, L] bool (contiguous). Runs the Triton
    kernel on CUDA (or under the interpreter) and :func:`select_unmask_ref` otherwise.
    """
    fn = select_unmask_triton if use_triton(_select_unmask_kernel, x0.device) else select_unmask_ref
    return fn(x0, conf, block, is_mask, threshold=threshold, k=k, active=active, force_all=force_all)
