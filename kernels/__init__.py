"""Triton kernels of the sampler's hot path, installed as ``nemotron_fast.kernels``.

One op per module, each with a private ``_<op>_kernel``, a checked host function ``<op>_triton``, a pure-torch
``<op>_ref`` twin (the ground truth and the CPU path) and a dispatcher ``<op>`` that picks the kernel for CUDA
tensors (or under ``TRITON_INTERPRET=1``) and the reference otherwise:

- :mod:`.confidence`: ``confidence_argmax`` - token choice (greedy or Gumbel-max) and its softmax probability;
- :mod:`.head_confidence`: ``head_confidence_argmax`` - the same fused with the output head's matmul;
- :mod:`.select`: ``select_unmask`` - reveal the step's tokens of every row in place;
- :mod:`.kv_write`: ``kv_write`` - write a block's K or V into the preallocated cache.

``philox_uniform64_ref(seed, offset, shape)`` rebuilds the noise the confidence kernels draw in-kernel from
``seed``/``offset``, so a reference run can consume exactly the same randomness.
"""

from ._philox import philox_uniform64_ref
from .confidence import confidence_argmax, confidence_argmax_ref, confidence_argmax_triton
from .head_confidence import head_confidence_argmax, head_confidence_argmax_ref, head_confidence_argmax_triton
from .kv_write import kv_write, kv_write_ref, kv_write_triton
from .unmask import round_threshold, select_unmask, select_unmask_ref, select_unmask_triton

__all__ = [
    "confidence_argmax",
    "confidence_argmax_ref",
    "confidence_argmax_triton",
    "head_confidence_argmax",
    "head_confidence_argmax_ref",
    "head_confidence_argmax_triton",
    "select_unmask",
    "select_unmask_ref",
    "select_unmask_triton",
    "round_threshold",
    "kv_write",
    "kv_write_ref",
    "kv_write_triton",
    "philox_uniform64_ref",
]
