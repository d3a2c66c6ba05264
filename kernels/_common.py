"""Helpers shared by the kernel modules: where a kernel may run, and the argument checks every host function
makes before it launches anything.

A Triton kernel runs on CUDA tensors, or on CPU tensors when it was decorated under ``TRITON_INTERPRET=1``
(Triton decides that once, when the kernel module is imported). The host functions (``*_triton``) look at the
kernel object itself; the dispatchers send CPU tensors to the interpreter only while ``TRITON_INTERPRET=1``
is also set at call time, so a test session that imported the kernels under the interpreter does not move
every other CPU caller off the torch reference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "FLOAT_DTYPES",
    "is_interpreted",
    "use_triton",
    "check_launchable",
    "check_same_device",
    "num_sms",
    "next_pow2",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` and so runs on CPU tensors."""
    return isinstance(kernel, InterpretedFunction)


def use_triton(kernel: object, device: torch.device) -> bool:
    """The dispatch rule of every op: the Triton kernel for CUDA tensors, or for CPU tensors while the
    interpreter is on (``kernel`` interpreted and ``TRITON_INTERPRET=1`` now); else the torch reference."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and is_interpreted(kernel) and bool(triton.knobs.runtime.interpret)


def check_launchable(kernel: object, device: torch.device, op: str) -> None:
    """Raise unless ``kernel`` can run on tensors of ``device``."""
    if device.type == "cuda" or (device.type == "cpu" and is_interpreted(kernel)):
        return
    if device.type == "cpu":
        raise ValueError(f"{op}: CPU tensors run the Triton kernel only when TRITON_INTERPRET=1 was set before "
                         f"nemotron_fast.kernels was imported; call {op.removesuffix('_triton')} or "
                         f"{op.removesuffix('_triton')}_ref instead.")
    raise ValueError(f"{op}: tensors on {device} are not supported; use CUDA or CPU tensors.")


def check_same_device(op: str, tensors: Iterable[tuple[str, torch.Tensor | None]]) -> torch.device:
    """Raise unless every given tensor lives on one device; return that device."""
    device = None
    first = ""
    for name, t in tensors:
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; move them to one device.")
    if device is None:
        raise ValueError(f"{op}: no tensor argument was given.")
    return device


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for the CPU interpreter), cached per device."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sms(index)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
