"""kv_write: the Triton cache write vs slice assignment, exactly, with untouched slots checked by NaN poison."""

from __future__ import annotations

import importlib

import pytest
import torch

from nemotron_fast.kernels._common import is_interpreted
from nemotron_fast.kernels.kv_write import kv_write, kv_write_ref, kv_write_triton

# The package re-exports the kv_write function under the module's name, so fetch the module itself.
mod = importlib.import_module("nemotron_fast.kernels.kv_write")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, H, S, L, D): L = 1, L = 7 with an odd head dim, a full 32-token block at D = 128.
SHAPES = [(1, 1, 5, 1, 1), (3, 2, 40, 7, 24), (2, 3, 64, 32, 128)]


def _nan_cache(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,slots,length,dim", SHAPES)
@pytest.mark.parametrize("start_kind", ["first", "last", "per_row"])
def test_matches_slice_assignment(device, dtype, batch, heads, slots, length, dim, start_kind):
    g = torch.Generator().manual_seed(slots + length)
    # new as the attention layout [B, L, H, D] viewed as [B, H, L, D]: not contiguous.
    new = torch.randn(batch, length, heads, dim, generator=g).to(dtype).transpose(1, 2)
    if start_kind == "per_row":
        start = torch.randint(0, slots - length + 1, (batch,), generator=g)
    else:
        start = 0 if start_kind == "first" else slots - length
    expected = kv_write_ref(_nan_cache((batch, heads, slots, dim), dtype), new, start)
    cache = _nan_cache((batch, heads, slots, dim), dtype).to(device)
    out = kv_write_triton(cache, new.to(device), start.to(device) if isinstance(start, torch.Tensor) else start)
    assert out is cache
    assert _same(cache.cpu(), expected)


def test_per_row_start_writes_each_row_at_its_own_offset(device):
    new = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    cache = kv_write_triton(torch.zeros(2, 1, 8, 2, device=device), new.to(device),
                            torch.tensor([1, 4], device=device)).cpu()
    assert torch.equal(cache[0, 0, 1:4], new[0, 0]) and torch.equal(cache[1, 0, 4:7], new[1, 0])
    assert cache[0, 0, [0, 4, 5, 6, 7]].eq(0).all() and cache[1, 0, [0, 1, 2, 3, 7]].eq(0).all()


def test_cache_as_a_view_of_a_bigger_buffer(device):
    # The cache slice of a [2, B, H, S, D] K/V buffer, with int32 per-row starts.
    buf = torch.zeros(2, 2, 3, 16, 8, device=device)
    new = torch.randn(2, 3, 5, 8)
    kv_write_triton(buf[1], new.to(device), torch.tensor([0, 11], dtype=torch.int32, device=device))
    expected = torch.zeros(2, 2, 3, 16, 8)
    kv_write_ref(expected[1], new, torch.tensor([0, 11], dtype=torch.int32))
    assert torch.equal(buf.cpu(), expected)


def test_out_of_range_tensor_start_is_skipped_by_the_kernel(device):
    # A device-side start is never read back; slots outside [0, S) are dropped instead of corrupting memory.
    cache = torch.zeros(1, 1, 6, 4, device=device)
    kv_write_triton(cache, torch.ones(1, 1, 4, 4, device=device), torch.tensor([4], device=device))
    assert cache.cpu()[0, 0, :, 0].tolist() == [0, 0, 0, 0, 1, 1]


def test_dispatcher_routes_by_device_and_interpreter(monkeypatch):
    monkeypatch.setattr(mod, "kv_write_ref", lambda *a: "ref")
    monkeypatch.setattr(mod, "kv_write_triton", lambda *a: "triton")
    args = (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 2, 2), 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kv_write(*args) == "ref"
    if is_interpreted(mod._kv_write_kernel):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kv_write(*args) == "triton"


@pytest.mark.parametrize("cache,new,start,match", [
    (torch.zeros(1, 1, 4), torch.zeros(1, 1, 2, 2), 0, "4 dims"),
    (torch.zeros(1, 2, 4, 2), torch.zeros(1, 1, 2, 2), 0, "B, H and D"),
    (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 2, 2, dtype=torch.float16), 0, "one float dtype"),
    (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 2, 2), 3, r"\[3, 5\) do not fit a cache of 4"),
    (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 2, 2), -1, "do not fit"),
    (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 2, 2), 1.0, "int or an int tensor"),
    (torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 2, 2), torch.zeros(2, dtype=torch.long), r"shape \[1\]"),
])
def test_invalid_arguments_raise_a_sentence(cache, new, start, match):
    for fn in (kv_write_ref, kv_write_triton):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(cache, new, start)


@pytest.mark.requires_gpu
def test_real_cache_size_on_gpu():
    cache = torch.zeros(4, 8, 4096, 128, dtype=torch.bfloat16, device="cuda")
    new = torch.randn(4, 32, 8, 128, device="cuda").bfloat16().transpose(1, 2)
    start = torch.tensor([0, 100, 2000, 4064], device="cuda")
    expected = kv_write_ref(cache.clone(), new, start)
    assert torch.equal(kv_write_triton(cache, new, start), expected)
