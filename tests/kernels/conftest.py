"""Kernel tests: Triton kernels run on CUDA when there is a GPU, else under Triton's interpreter on CPU tensors.

Triton picks compiled vs interpreted when a kernel is decorated, i.e. when its module is imported, so the
kernel modules are imported here with ``TRITON_INTERPRET=1`` (re-imported if something imported them
earlier). The variable is then restored, so tests outside this folder keep the torch reference on CPU, and an
autouse fixture turns it back on for each test in here (the dispatchers read it at call time).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_MODULES = (
    "nemotron_fast.kernels._common",
    "nemotron_fast.kernels._philox",
    "nemotron_fast.kernels.confidence",
    "nemotron_fast.kernels.head_confidence",
    "nemotron_fast.kernels.unmask",
    "nemotron_fast.kernels.block_attention",
    "nemotron_fast.kernels",
)


def _import_interpreted() -> None:
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is None:
                importlib.import_module(name)
            else:
                importlib.reload(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


if not HAS_CUDA:
    _import_interpreted()


@pytest.fixture(autouse=True)
def _interpreter_on(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU if there is one, else the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


def _poisoned_empty(real_empty):
    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-123456)
        return t

    return empty


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Within the block, ``torch.empty`` returns NaN (floats), True (bool) or -123456 (ints), so an output or
    partial buffer a kernel forgets to write shows up as a mismatch."""
    real = torch.empty
    torch.empty = _poisoned_empty(real)
    try:
        yield
    finally:
        torch.empty = real


@pytest.fixture
def poison() -> Callable[[], contextlib.AbstractContextManager]:
    """:func:`poisoned_empty` as a fixture: ``with poison(): out = kernel(...)``."""
    return poisoned_empty
