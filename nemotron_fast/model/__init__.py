"""Our implementation of the NLD model (text backbone, vision tower, projector) and its KV cache."""

from .cache import KVCache
from .nld import NLDModel, load

__all__ = ["NLDModel", "KVCache", "load"]
