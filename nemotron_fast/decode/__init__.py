"""The fast paths of the two other decoding modes of the same weights (block diffusion is
:mod:`nemotron_fast.generate`): :mod:`.ar` (upstream ``ar_generate``) and :mod:`.linear_spec` (upstream
``linear_spec_generate``, batched). Both run on our model over the preallocated :class:`KVCache` and give the
tokens and NFE of :mod:`nemotron_fast.reference_modes`."""

from .ar import generate_ar
from .linear_spec import generate_linear_spec

__all__ = ["generate_ar", "generate_linear_spec"]
