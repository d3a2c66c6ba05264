"""``torch.ops.nemotron_fast.select_unmask``: the select/unmask step as a registered torch operator.

The schema is defined here, once, so the op exists with or without the CUDA extension:

- CPU: the torch reference ``select_unmask_ref``;
- CUDA: the kernel of ``nemotron_fast._C`` (``csrc/``, built by ``setup.py`` for sm_80, sm_90 and compute_90
  PTX); without the extension the same torch reference (sync-free on CUDA too), with a warning on first use;
- Meta / FakeTensor: a fake implementation that only allocates ``revealed``, so the op traces under
  ``torch.compile`` and ``FakeTensorMode``.

``block`` and ``is_mask`` are marked mutable in the schema (``Tensor(a!)``, ``Tensor(b!)``); the op returns the
freshly allocated ``revealed`` mask. Importing this module registers everything; nothing else needs to run.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from nemotron_fast.kernels.unmask import select_unmask_ref

__all__ = ["SELECT_UNMASK_SCHEMA", "HAS_CUDA_EXTENSION", "CUDA_EXTENSION_ERROR", "select_unmask"]

SELECT_UNMASK_SCHEMA = (
    "select_unmask(Tensor x0, Tensor conf, Tensor(a!) block, Tensor(b!) is_mask, Tensor? k, Tensor? active, "
    "float? threshold, bool force_all=False) -> Tensor"
)

# The Library object owns the registrations; it lives as long as this module.
_LIB = torch.library.Library("nemotron_fast", "FRAGMENT")
_LIB.define(SELECT_UNMASK_SCHEMA)


def _load_extension() -> str | None:
    # After define(): the extension only adds the CUDA kernel to the schema above.
    try:
        importlib.import_module("nemotron_fast._C")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


CUDA_EXTENSION_ERROR = _load_extension()
HAS_CUDA_EXTENSION = CUDA_EXTENSION_ERROR is None


def _select_unmask_cpu(x0: torch.Tensor, conf: torch.Tensor, block: torch.Tensor, is_mask: torch.Tensor,
                       k: torch.Tensor | None, active: torch.Tensor | None, threshold: float | None,
                       force_all: bool = False) -> torch.Tensor:
    return select_unmask_ref(x0, conf, block, is_mask, threshold=threshold, k=k, active=active, force_all=force_all)


_warned = False


def _select_unmask_cuda_twin(x0: torch.Tensor, conf: torch.Tensor, block: torch.Tensor, is_mask: torch.Tensor,
                             k: torch.Tensor | None, active: torch.Tensor | None, threshold: float | None,
                             force_all: bool = False) -> torch.Tensor:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"nemotron_fast._C is not built ({CUDA_EXTENSION_ERROR}); select/unmask runs the torch twin "
                      f"on CUDA. Build it with: NEMOTRON_FAST_FORCE_CUDA=1 pip install --no-deps "
                      f"--no-build-isolation -e .", RuntimeWarning, stacklevel=3)
    return _select_unmask_cpu(x0, conf, block, is_mask, k, active, threshold, force_all)


def _select_unmask_fake(x0: torch.Tensor, conf: torch.Tensor, block: torch.Tensor, is_mask: torch.Tensor,
                        k: torch.Tensor | None, active: torch.Tensor | None, threshold: float | None,
                        force_all: bool = False) -> torch.Tensor:
    torch._check(x0.dim() == 2, lambda: f"select_unmask: x0 must have shape [B, L], got {tuple(x0.shape)}.")
    for name, t in (("conf", conf), ("block", block), ("is_mask", is_mask)):
        torch._check(t.shape == x0.shape, lambda name=name, t=t: f"select_unmask: {name} has shape "
                     f"{tuple(t.shape)} but x0 has {tuple(x0.shape)}; they must match.")
    torch._check(threshold is not None or force_all or k is not None,
                 lambda: "select_unmask: threshold=None needs k, the number of tokens to reveal per row.")
    return x0.new_empty(x0.shape, dtype=torch.bool)


_LIB.impl("select_unmask", _select_unmask_cpu, "CPU")
if not HAS_CUDA_EXTENSION:
    _LIB.impl("select_unmask", _select_unmask_cuda_twin, "CUDA")
torch.library.register_fake("nemotron_fast::select_unmask", _select_unmask_fake, lib=_LIB)


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
    """Call ``torch.ops.nemotron_fast.select_unmask`` with keyword arguments.

    ``x0``: [B, L] int64. ``conf``: [B, L] float32/bfloat16/float16. ``block``: [B, L] int64 and ``is_mask``:
    [B, L] bool, both updated in place. ``threshold``: float or None (then ``k`` [B] int64/int32 tokens per
    row). ``active``: [B] bool or None (all rows). ``force_all``: reveal every mask. Returns ``revealed``
    [B, L] bool. Semantics: :mod:`nemotron_fast.kernels.unmask`.
    """
    return torch.ops.nemotron_fast.select_unmask(x0, conf, block, is_mask, k, active, threshold, force_all)
