"""Fixtures of the pytest-benchmark suites (``pytest benchmarks/ --benchmark-only``): the Tekken-vocab head and
a Tekken-vocab VLM checkpoint (``tekken-h64``, issue 6's model), written once into the runner's cache.

Threads follow the runner's ``auto`` rule (1 thread on a busy CPU); ``NEMOTRON_FAST_BENCH_THREADS`` overrides it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TEKKEN_VOCAB = 131072


def pytest_configure(config: pytest.Config) -> None:
    from benchmarks.run import _set_threads

    note = _set_threads(os.environ.get("NEMOTRON_FAST_BENCH_THREADS", "auto"), torch.device("cpu"))
    config.stash[_THREADS] = note


_THREADS = pytest.StashKey[str]()


def pytest_report_header(config: pytest.Config) -> str:
    return f"nemotron_fast benchmarks: torch threads {config.stash.get(_THREADS, '?')}"


@dataclass
class Loaded:
    """A loaded checkpoint, its reference twin and a prompt with one image."""

    model: Any
    twin: Any
    ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None


@pytest.fixture(scope="session")
def tekken_vlm() -> Loaded:
    import nemotron_fast
    from benchmarks.matrix import MODELS, build_prompt, model_path
    from nemotron_fast import reference

    model = nemotron_fast.load(model_path(MODELS["tekken-h64"], None), dtype=torch.float32)
    twin = reference.get_twin(model)
    p = build_prompt(model, "image")
    return Loaded(model, twin, p.ids, p.pixel_values, p.image_sizes)


@pytest.fixture(scope="session")
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
