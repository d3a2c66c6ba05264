"""The Philox noise twin: Random123 known answers, the uniform mapping, and agreement with Triton's generator."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from nemotron_fast.kernels._common import is_interpreted
from nemotron_fast.kernels._philox import philox4x32_10, philox_uniform64, philox_uniform64_ref

# Random123's kat_vectors for philox4x32_10: (counter words, key words) -> output words.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _draw(out_ptr, seed: tl.int64, offset: tl.int64, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, philox_uniform64(seed, offset + i), mask=i < n)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    out = philox4x32_10(tuple(torch.tensor([w]) for w in counter), *key)
    assert [int(w) for w in out] == list(expected)


def test_uniforms_are_open_unit_interval_and_uniform():
    u = philox_uniform64_ref(42, 0, (200_000,))
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50.0, f"chi-square {chi2:.1f} over 20 bins (19 dof, p = 1e-4 cut ~ 50)"


def test_draws_depend_only_on_seed_and_counter():
    a = philox_uniform64_ref(3, 10, (4, 5))
    assert torch.equal(a.flatten()[5:], philox_uniform64_ref(3, 15, (15,)))
    assert not torch.equal(a, philox_uniform64_ref(4, 10, (4, 5)))
    assert torch.equal(a, philox_uniform64_ref(3, 10, (4, 5)))


@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 2**33 + 7), (2**62 + 3, 99)])
def test_device_function_matches_the_twin(device, seed, offset):
    # Decorated here, while the kernel fixture has the interpreter on (CPU), so it runs on this device.
    kernel = triton.jit(_draw)
    assert device == "cuda" or is_interpreted(kernel)
    out = torch.full((300,), float("nan"), dtype=torch.float64, device=device)
    kernel[(3,)](out, seed, offset, 300, BLOCK=128)
    assert torch.equal(out.cpu(), philox_uniform64_ref(seed, offset, (300,)))
