"""Timing, memory and the parity gate.

Every comparison is measured in one process, the contenders interleaved: after one untimed warm-up call each
(the reference and fast warm-up calls are also the parity check), each round runs every contender once, the
order reversed on odd rounds so slow drift in the machine's load hits all of them alike, and each contender's
reported time is its median over the rounds. Wall time is the metric: on CUDA the elapsed time between two CUDA
events recorded around the call on the current stream (the device synchronised before the call and on the end
event after it), on the CPU ``perf_counter``; process CPU time is kept beside it as a noise indicator.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the call minus what was allocated before it; on
the CPU (where tracemalloc cannot see torch's allocations) the process's resident-set high-water mark, which
Linux lets us reset before each call (``/proc/self/clear_refs``), minus the resident set at the start of the
call, after returning freed heap to the OS. Without that reset the ``ru_maxrss`` increase is reported instead (a
lower bound).
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import nemotron_fast
from nemotron_fast import reference
from nemotron_fast.sampling import GenerationResult, SamplingPolicy

__all__ = ["ParityError", "Sample", "Contender", "fast_generate", "reference_generate", "check_parity",
           "timed_call", "run_rounds", "policy_from_name"]


def fast_generate(*args: Any, **kwargs: Any) -> GenerationResult:
    """The fast sampler (a seam: tests replace it to check that the parity gate bites)."""
    return nemotron_fast.generate(*args, **kwargs)


def reference_generate(*args: Any, **kwargs: Any) -> GenerationResult:
    """The reference sampler (upstream's algorithm on the transformers twin)."""
    return reference.generate(*args, **kwargs)


def policy_from_name(name: str) -> SamplingPolicy:
    """``"exclude_mask+finish_last_step"`` -> the policy with those switches on."""
    parts = [p for p in name.split("+") if p]
    known = ("exclude_mask", "finish_last_step", "per_row_eos")
    bad = [p for p in parts if p not in known]
    if bad:
        raise ValueError(f"unknown policy switch(es) {bad}; known: {list(known)}")
    return SamplingPolicy(**{p: True for p in parts})


class ParityError(AssertionError):
    """The fast sampler's output differs from the reference's: no timing may be reported."""


def check_parity(label: str, ref: GenerationResult, fast: GenerationResult) -> None:
    """Raise :class:`ParityError` unless completion ids, NFE and the reveal trace are identical."""
    problems = []
    if fast.completion_ids != ref.completion_ids:
        for r, (a, b) in enumerate(zip(ref.completion_ids, fast.completion_ids)):
            if a != b:
                i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                problems.append(f"row {r}: completion ids differ first at offset {i} (reference "
                                f"{a[i:i + 4]} vs fast {b[i:i + 4]}; lengths {len(a)} vs {len(b)})")
                break
        else:
            problems.append(f"completion rows differ: {len(ref.completion_ids)} vs {len(fast.completion_ids)}")
    if fast.nfe != ref.nfe:
        problems.append(f"NFE differs: reference {ref.nfe} vs fast {fast.nfe}")
    if fast.trace != ref.trace:
        i = next((i for i, (a, b) in enumerate(zip(ref.trace, fast.trace)) if a != b),
                 min(len(ref.trace), len(fast.trace)))
        problems.append(f"reveal trace differs first at step {i} (of {len(ref.trace)} vs {len(fast.trace)})")
    if problems:
        raise ParityError(f"parity failure on {label}: " + "; ".join(problems))


# ---- one timed call ----------------------------------------------------------------------------------------

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field_name: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so the next call's peak is not hidden by cached pages."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Sample:
    """One timed call: wall and process-CPU seconds, peak memory over the call (MiB), and the result."""

    wall: float
    cpu: float
    peak_mib: float
    peak_total_mib: float | None
    result: Any = None


def timed_call(fn: Callable[[], Any], device: torch.device) -> Sample:
    """Run ``fn`` once with the device synchronised around it; measure wall time, CPU time and peak memory."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        reset = True
    else:
        _trim_heap()
        reset = _reset_hwm()
        if reset:
            base = (_status_kib("VmRSS") or 0) * 1024
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c0, t0 = time.process_time(), time.perf_counter()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        wall = start.elapsed_time(end) / 1e3
    else:
        result = fn()
        wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        total = peak
    elif reset:
        peak = (_status_kib("VmHWM") or 0) * 1024
        total = peak
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        total = None
    mib = 2.0**20
    return Sample(wall, cpu, max(peak - base, 0) / mib, total / mib if total is not None else None, result)


# ---- contenders and rounds ---------------------------------------------------------------------------------

@dataclass
class Contender:
    """Something timed in the rounds: a sampler call (``call`` returns a GenerationResult) or a floor replay
    (``call`` returns seconds of GEMM time; its ``floor_of`` names the contenders it is the floor of)."""

    name: str
    call: Callable[[], Any]
    kind: str = "sampler"  # "sampler" | "floor"
    samples: list[Sample] = field(default_factory=list)
    floor_values: list[float] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def median_sample(self) -> Sample:
        """The sample whose wall time is the median (the lower middle one for an even count)."""
        ordered = sorted(self.samples, key=lambda s: s.wall)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def floor_seconds(self) -> float:
        return statistics.median(self.floor_values)


def run_rounds(contenders: list[Contender], reps: int, device: torch.device,
               progress: Callable[[str], None] | None = None) -> None:
    """``reps`` rounds over ``contenders`` (warm-up done by the caller), order reversed on odd rounds."""
    for r in range(reps):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            if c.kind == "floor":
                c.floor_values.append(c.call())
            else:
                c.samples.append(timed_call(c.call, device))
            if progress is not None:
                # no numbers here: nothing timed is shown before every parity check of the run has passed
                progress(f"round {r + 1}/{reps}: {c.name}")
