"""The select/unmask step of one denoise step: which masked positions of each row are revealed, written into the
block in place, with no host synchronisation, so the denoise loop never waits on the GPU.

One implementation per device: on CUDA the kernel of the ``nemotron_fast._C`` extension (``csrc/``), called
through ``torch.ops.nemotron_fast.select_unmask`` (:mod:`nemotron_fast._ops`); everywhere else the vectorised
torch twin :func:`select_unmask_ref`, which is also the ground truth and what the op runs on CUDA when the
extension was not built.

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

from ._common import FLOAT_DTYPES, check_same_device

__all__ = ["select_unmask", "select_unmask_ref", "round_threshold"]


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
    ``threshold`` and ``k``). Any strides. Returns ``revealed`` [B, L] bool (contiguous). CUDA tensors go to
    ``torch.ops.nemotron_fast.select_unmask`` (the ``csrc/`` kernel), others to :func:`select_unmask_ref`.
    """
    if isinstance(x0, torch.Tensor) and x0.device.type == "cuda":
        from nemotron_fast import _ops  # registers the op; imported here, as _ops imports this module

        return _ops.select_unmask(x0, conf, block, is_mask, threshold=threshold, k=k, active=active,
                                  force_all=force_all)
    return select_unmask_ref(x0, conf, block, is_mask, threshold=threshold, k=k, active=active, force_all=force_all)
