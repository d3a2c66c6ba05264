"""first_argmax (the CPU path's argmax) equals torch.argmax exactly, ties and odd widths included."""

from __future__ import annotations

import pytest
import torch

from nemotron_fast.kernels.head_confidence import first_argmax


@pytest.mark.parametrize("v", [1, 7, 1023, 1024, 1025, 5000, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equals_torch_argmax(v: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(v)
    key = torch.randn(6, v, generator=g).to(dtype)
    key[1] = 0.0  # all tied -> index 0
    if v > 3:
        key[2, v - 1] = key[2, 1] = 99.0  # tie across segments -> the lower index
    key[3] = float("-inf")
    key[4, :] = key[4].round()  # many ties at coarse values
    assert torch.equal(first_argmax(key), key.argmax(-1))


def test_nan_rows_follow_torch() -> None:
    key = torch.randn(3, 2100)
    key[1, 1500] = float("nan")
    assert torch.equal(first_argmax(key), key.argmax(-1))


@pytest.mark.parametrize("v", [2048, 2100])
def test_non_contiguous_input(v: int) -> None:
    key = torch.randn(v, 5).t()
    assert not key.is_contiguous()
    assert torch.equal(first_argmax(key), key.argmax(-1))
