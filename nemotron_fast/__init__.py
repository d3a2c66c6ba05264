"""nemotron_fast: fast, faithful block-diffusion inference for Nemotron-Labs-Diffusion models.

The server, the reference sampler and the checking twin import lazily; ``import nemotron_fast`` costs
about what ``import torch`` costs.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly: the submodule ``nemotron_fast.generate`` would otherwise shadow the function of that name.
from .generate import generate

__version__ = "0.1.0"

__all__ = [
    "load",
    "generate",
    "Pipeline",
    "Engine",
    "EngineRequest",
    "EngineOutput",
    "SamplingPolicy",
    "GenerationResult",
    "patch",
    "unpatch",
    "reference",
    "testing",
    "__version__",
]

_LAZY = {
    "load": ("nemotron_fast.model", "load"),
    "Pipeline": ("nemotron_fast.pipeline", "Pipeline"),
    "Engine": ("nemotron_fast.engine", "Engine"),
    "EngineRequest": ("nemotron_fast.engine", "EngineRequest"),
    "EngineOutput": ("nemotron_fast.engine", "EngineOutput"),
    "SamplingPolicy": ("nemotron_fast.sampling", "SamplingPolicy"),
    "GenerationResult": ("nemotron_fast.sampling", "GenerationResult"),
    "patch": ("nemotron_fast.drop_in", "patch"),
    "unpatch": ("nemotron_fast.drop_in", "unpatch"),
}
_SUBMODULES = {"reference", "testing", "kernels", "config", "processing", "model", "errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"nemotron_fast.{name}")
    raise AttributeError(f"module 'nemotron_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
