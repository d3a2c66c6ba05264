"""Triton kernels of the sampler's hot path, installed as ``nemotron_fast.kernels``.

One op per module, each with a private ``_<op>_kernel``, a checked host function ``<op>_triton``, a pure-torch
``<op>_ref`` twin (the ground truth and the CPU path) and a dispatcher ``<op>`` that picks the kernel for CUDA
tensors (or under ``TRITON_INTERPRET=1``) and the reference otherwise:

- :mod:`.confidence`: ``confidence_argmax`` - token choice (greedy or Gumbel-max) and its softmax probability;
- :mod:`.head_confidence`: ``head_confidence_argmax`` - the same fused with the output head's matmul;
- :mod:`.unmask`: ``select_unmask`` - reveal the step's tokens of every row in place (on CUDA the ``csrc/``
  kernel through ``torch.ops.nemotron_fast.select_unmask``, so this module has no Triton kernel);
- :mod:`.block_attention`: ``block_attention`` - a block's queries over its row's cached prefix plus the block
  (causal or bidirectional, GQA, split-KV), with the block's K/V written into the static cache by the same launch.

``philox_uniform64_ref(seed, offset, shape)`` rebuilds the noise the confidence kernels draw in-kernel from
``seed``/``offset``, so a reference run can consume exactly the same randomness.
"""

from ._philox import philox_uniform64_ref
from .block_attention import block_attention, block_attention_ref, block_attention_triton
from .confidence import confidence_argmax, confidence_argmax_ref, confidence_argmax_triton
from .head_confidence import head_confidence_argmax, head_confidence_argmax_ref, head_confidence_argmax_triton
from .unmask import round_threshold, select_unmask, select_unmask_ref

__all__ = [
    "confidence_argmax",
    "confidence_argmax_ref",
    "confidence_argmax_triton",
    "head_confidence_argmax",
    "head_confidence_argmax_ref",
    "head_confidence_argmax_triton",
    "select_unmask",
    "select_unmask_ref",
    "round_threshold",
    "block_attention",
    "block_attention_ref",
    "block_attention_triton",
    "philox_uniform64_ref",
]
