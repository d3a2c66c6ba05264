"""Shared fixtures: tiny checkpoints in the real layout, written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (requires_gpu)")
    skip_w = pytest.mark.skip(reason="set NEMOTRON_FAST_WEIGHTS to a real checkpoint directory (requires_weights)")
    for item in items:
        if "requires_gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)
        if "requires_weights" in item.keywords and not os.environ.get("NEMOTRON_FAST_WEIGHTS"):
            item.add_marker(skip_w)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory: pytest.TempPathFactory):
    """``ckpt_factory(**kwargs)`` -> path of a tiny checkpoint written with those arguments (cached per kwargs)."""
    from nemotron_fast.testing import write_tiny_checkpoint

    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            path = tmp_path_factory.mktemp("ckpt")
            cache[key] = write_tiny_checkpoint(path, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def vlm_ckpt(ckpt_factory) -> Path:
    return ckpt_factory(vlm=True, seed=0)


@pytest.fixture(scope="session")
def text_ckpt(ckpt_factory) -> Path:
    return ckpt_factory(vlm=False, seed=1)
