"""Counter-based float64 uniform noise: Philox4x32-10 (Triton's ``tl.randint4x``) and its exact torch twin.

Element ``i`` of a draw is a pure function of ``(seed, offset + i)``, so a kernel can draw its Gumbel noise
in registers and the reference can rebuild the very same tensor: with ``u = philox_uniform64_ref(seed,
offset, shape)``, the seeded kernel and the reference fed ``u`` choose identical tokens.

Two 32-bit Philox outputs give 52 random bits ``x`` and ``u = (x + 0.5) / 2**52``: exact in float64 and
strictly inside (0, 1), so ``-log(u)`` is finite and positive.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["philox_uniform64", "philox_uniform64_at", "philox_uniform64_ref", "philox4x32_10", "check_seed",
           "offset_value", "offset_pointer"]

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


@triton.jit
def philox_uniform64(seed, counter):
    """float64 uniforms in (0, 1) for int64 ``counter`` values under the int64 ``seed`` (device function)."""
    c0, c1, _, _ = tl.randint4x(seed, counter)
    x = (c0 >> 6).to(tl.float64) * 67108864.0 + (c1 >> 6).to(tl.float64)
    return (x + 0.5) * (1.0 / 4503599627370496.0)


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # 32 x 32 -> 64-bit product of int64 tensors holding uint32 values, without int64 overflow: split b.
    t = a * (b & 0xFFFF)
    u = a * (b >> 16)
    low_part = t + ((u & 0xFFFF) << 16)
    return (u >> 16) + (low_part >> 32), low_part & _MASK32


def philox4x32_10(c: tuple[torch.Tensor, ...], k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words: counter ``c`` (four words), key ``(k0, k1)``."""
    c0, c1, c2, c3 = c
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform64_at(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """The float64 uniforms :func:`philox_uniform64` draws for an int64 ``counter`` tensor (any shape)."""
    zero = torch.zeros_like(counter)
    c0, c1, _, _ = philox4x32_10((counter & _MASK32, (counter >> 32) & _MASK32, zero, zero),
                                 seed & _MASK32, (seed >> 32) & _MASK32)
    x = (c0 >> 6).double() * 67108864.0 + (c1 >> 6).double()
    return (x + 0.5) * (1.0 / 4503599627370496.0)


def philox_uniform64_ref(seed: int, offset: int | torch.Tensor, shape: tuple[int, ...] | torch.Size,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise :func:`philox_uniform64` draws for counters ``offset + arange(numel)``, as a float64 tensor of
    ``shape`` (row-major: element ``[n, v]`` of an [N, V] draw uses counter ``offset + n * V + v``)."""
    check_seed("philox_uniform64_ref", seed, offset)
    offset = offset_value(offset)
    numel = 1
    for s in shape:
        numel *= int(s)
    counter = offset + torch.arange(numel, dtype=torch.int64, device=device)
    return philox_uniform64_at(seed, counter).reshape(tuple(shape))


def check_seed(op: str, seed: int, offset: int | torch.Tensor, device: torch.device | None = None) -> None:
    """Raise unless ``seed`` is an int in [0, 2**63) and ``offset`` is one too, or an int64 tensor of one element
    (on ``device`` when given) holding the offset, read by the kernel at launch time."""
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64 or offset.numel() != 1:
            raise ValueError(f"{op}: an offset tensor must be int64 with one element, got {offset.dtype} "
                             f"{tuple(offset.shape)}.")
        if device is not None and offset.device != device:
            raise ValueError(f"{op}: the offset tensor is on {offset.device} but the data is on {device}.")
        values = (("seed", seed),)
    else:
        values = (("seed", seed), ("offset", offset))
    for name, v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise ValueError(f"{op}: {name} must be an int in [0, 2**63), got {v!r}.")


def offset_value(offset: int | torch.Tensor) -> int:
    """The Philox offset as an int (reads a tensor offset; a host sync for a CUDA tensor, so references only)."""
    return int(offset.reshape(()).item()) if isinstance(offset, torch.Tensor) else offset


def offset_pointer(offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The int64 one-element tensor a kernel reads its Philox offset from: ``offset`` itself when it is one (so a
    CUDA-graph replay sees the value the caller advanced in place), else a new tensor holding it."""
    if isinstance(offset, torch.Tensor):
        return offset.reshape(1)
    return torch.tensor([offset], dtype=torch.int64, device=device)
