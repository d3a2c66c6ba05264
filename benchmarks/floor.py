"""The distance to the floor: what the run's matrix multiplies cost alone on this machine.

:func:`run_gemms` lists every GEMM a generation needs, from the model's config and the run's own reveal trace:
the vision tower and projector over the image patches, the prefill over the prompt, each denoise step's backbone
over the block plus the head over the positions still masked at that step (the only rows whose logits matter),
and each commit's backbone plus the head over one position per row. :class:`Floor` replays that list with
``torch.matmul`` on random tensors of the same shapes and dtype (``x @ w.t()``, the layout ``F.linear`` sees) and
sums the times: identical shapes are timed a few times and multiplied by their count, so the replay costs seconds
even for long runs. Attention's two GEMMs (``Q K^T``, ``P V``) are replayed together as one unmasked
``F.scaled_dot_product_attention`` call, the fused kernel the model itself uses: two separate ``matmul`` calls
would materialise the scores and, for long prompts, cost more than the real attention - not a floor.

The reference and the fast sampler share one floor: after the parity gate they ran the same algorithm, so the
same GEMMs are necessary, whichever implementation does more. The floor is optimistic on purpose: no norms, no
RoPE, no selection, no Python, and the replayed weights stay warm in the cache between repeats of one shape.
``measured / floor`` says how much of the time goes to anything but the necessary matrix multiplies.

On CUDA, :func:`cuda_bandwidth` adds the roofline line: the bytes one forward must stream (weights + cached K/V),
the per-forward floor ``bytes / measured copy bandwidth``, and measured / floor for the decode loop.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Gemm", "run_gemms", "Floor", "weight_bytes_per_forward", "kv_bytes_per_forward", "cuda_bandwidth"]


@dataclass(frozen=True)
class Gemm:
    """``[m, k] @ [k, n]`` (a linear layer: ``batch`` 0), or with ``attn`` an attention over ``batch`` heads:
    ``m`` queries, ``n`` keys, head dim ``k`` (the GEMMs ``[m, k] @ [k, n]`` and ``[m, n] @ [n, k]`` per head)."""

    batch: int
    m: int
    k: int
    n: int
    attn: bool = False

    @property
    def flops(self) -> int:
        return (4 if self.attn else 2) * max(self.batch, 1) * self.m * self.k * self.n


def _backbone(cfg: Any, rows: int, q_len: int, kv_len: int, head_rows: int) -> Counter[Gemm]:
    """One text forward of ``rows`` x ``q_len`` tokens over ``kv_len`` keys; ``head_rows`` rows through the head."""
    t = cfg.text
    m, h, qd, kvd = rows * q_len, t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer: Counter[Gemm] = Counter({Gemm(0, m, h, qd): 1, Gemm(0, m, h, kvd): 2, Gemm(0, m, qd, h): 1,
                                        Gemm(0, m, h, t.intermediate_size): 2, Gemm(0, m, t.intermediate_size, h): 1})
    per_layer[Gemm(rows * t.num_attention_heads, q_len, t.head_dim, kv_len, attn=True)] += 1
    out: Counter[Gemm] = Counter({g: c * t.num_hidden_layers for g, c in per_layer.items()})
    if head_rows:
        out[Gemm(0, head_rows, h, t.vocab_size)] += 1
    return out


def _vision(cfg: Any, image_sizes: torch.Tensor | None) -> Counter[Gemm]:
    """The Pixtral tower (patch conv as a GEMM, per-image attention) and the projector, per image."""
    out: Counter[Gemm] = Counter()
    v = cfg.vision
    if v is None or image_sizes is None:
        return out
    merge = cfg.spatial_merge_size
    for hgt, wid in image_sizes.tolist():
        gh, gw = hgt // v.patch_size, wid // v.patch_size
        n = gh * gw
        out[Gemm(0, n, 3 * v.patch_size ** 2, v.hidden_size)] += 1
        layer: Counter[Gemm] = Counter({Gemm(0, n, v.hidden_size, v.hidden_size): 4,
                                        Gemm(0, n, v.hidden_size, v.intermediate_size): 2,
                                        Gemm(0, n, v.intermediate_size, v.hidden_size): 1,
                                        Gemm(v.num_attention_heads, n, v.head_dim, n, attn=True): 1})
        for g, c in layer.items():
            out[g] += c * v.num_hidden_layers
        merged = (gh // merge) * (gw // merge)
        out[Gemm(0, merged, v.hidden_size * merge * merge, v.hidden_size)] += 1
        out[Gemm(0, merged, v.hidden_size, cfg.text.hidden_size)] += 1
        out[Gemm(0, merged, cfg.text.hidden_size, cfg.text.hidden_size)] += 1
    return out


def run_gemms(cfg: Any, result: Any, *, rows: int, prompt_len: int, block_length: int,
              image_sizes: torch.Tensor | None = None) -> Counter[Gemm]:
    """Every GEMM of one generation (see the module docstring), as a multiset of shapes.

    ``cfg``: the model's :class:`~nemotron_fast.config.NLDConfig`; ``result``: the run's
    :class:`~nemotron_fast.sampling.GenerationResult` (its trace gives each denoise step's block and reveals);
    ``prompt_len``: the (padded) prompt length; ``image_sizes``: int64 [n_images, 2] or None.
    """
    length = block_length
    out = _vision(cfg, image_sizes)
    out += _backbone(cfg, rows, prompt_len, prompt_len, rows)
    blocks = result.nfe - len(result.trace)
    revealed: dict[int, list[int]] = {}  # per block: positions revealed so far, per row
    blk = 0
    for step in result.trace:
        offsets = [o for row in step for o in row]
        if offsets:
            blk = min(offsets) // length
        seen = revealed.setdefault(blk, [0] * rows)
        # masked rows at this step: the block starts with L - 1 masks per row (position 0 is the seed)
        masked = sum(max(length - 1 - seen[r], 0) for r in range(rows))
        out += _backbone(cfg, rows, length, prompt_len + (blk + 1) * length, masked)
        for r, row in enumerate(step):
            seen[r] += len(row)
    for b in range(blocks):
        out += _backbone(cfg, rows, length, prompt_len + (b + 1) * length, rows)
    return out


class Floor:
    """Times a GEMM multiset with ``torch.matmul`` on random tensors of its shapes (see the module docstring)."""

    def __init__(self, gemms: Counter[Gemm], dtype: torch.dtype, device: torch.device | str, repeats: int = 3):
        self.gemms = Counter({g: c for g, c in gemms.items() if c > 0 and min(g.m, g.k, g.n) > 0})
        self.dtype, self.device, self.repeats = dtype, torch.device(device), repeats
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self._warm = False

    @property
    def flops(self) -> int:
        return sum(g.flops * c for g, c in self.gemms.items())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _op(self, g: Gemm) -> Callable[[], torch.Tensor]:
        """A closure running ``g`` once on random operands."""
        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(shape, dtype=self.dtype, device=self.device)

        if g.attn:
            q, k, v = rand(1, g.batch, g.m, g.k), rand(1, g.batch, g.n, g.k), rand(1, g.batch, g.n, g.k)
            return lambda: F.scaled_dot_product_attention(q, k, v)
        # one weight per (k, n): shapes that differ only in m (the head over 1..L rows) share it
        if (g.k, g.n) not in self._weights:
            self._weights[(g.k, g.n)] = rand(g.n, g.k)
        x, wt = rand(g.m, g.k), self._weights[(g.k, g.n)].t()
        return lambda: torch.matmul(x, wt)

    def _time_one(self, g: Gemm) -> float:
        op = self._op(g)
        times: list[float] = []
        # at least ``repeats`` calls; tiny shapes repeat until 5 ms are covered, so a timer tick cannot dominate
        while len(times) < self.repeats or (sum(times) < 5e-3 and len(times) < 200):
            self._sync()
            t0 = time.perf_counter()
            op()
            self._sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    @torch.inference_mode()
    def measure(self) -> float:
        """Seconds the run's GEMMs take alone: per distinct shape, the median call time x its count.
        The first call also runs each shape once untimed (allocation, library dispatch)."""
        if not self._warm:
            for g in self.gemms:
                self._op(g)()
            self._sync()
            self._warm = True
        return sum(self._time_one(g) * c for g, c in self.gemms.items())

    def release(self) -> None:
        self._weights.clear()


def weight_bytes_per_forward(model: Any) -> int:
    """Bytes of weights one text forward streams: every decoder layer, the final norm and the output head (the
    embedding is a gather of a few rows, not a stream)."""
    enc = model.encoder
    tensors = [*enc.layers.parameters(), *enc.norm.parameters(), *model.diffusion_head.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes_per_forward(model: Any, batch: int, context: int) -> int:
    """Bytes of cached K and V one text forward reads at ``context`` cached positions per row."""
    t = model.config.text
    return 2 * t.num_hidden_layers * batch * t.num_key_value_heads * t.head_dim * context * model.dtype.itemsize


@functools.cache
def _copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of 1 GiB, median of 10 CUDA-event-timed
    copies after one warm-up): what streaming weights can achieve here, not the datasheet peak."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def cuda_bandwidth(model: Any, result: Any, seconds_decode: float, *, batch: int | None = None,
                   context: int = 0) -> dict[str, Any] | None:
    """On CUDA, the roofline line of a run: bytes one forward must stream (weights + the K/V of ``context``
    cached positions per row, default 0: weights only), the per-forward floor ``bytes / measured copy
    bandwidth``, the measured time per forward of the decode loop and ``measured / floor``. None on other
    devices."""
    device = model.device
    if device.type != "cuda":
        return None
    bandwidth = _copy_bandwidth(device)
    rows = batch if batch is not None else max(len(result.completion_ids), 1)
    nbytes = weight_bytes_per_forward(model) + kv_bytes_per_forward(model, rows, context)
    per_forward = nbytes / bandwidth
    forwards = max(result.nfe, 1)
    measured = seconds_decode / forwards
    return {
        "device_name": torch.cuda.get_device_name(device),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "weight_bytes_per_forward": weight_bytes_per_forward(model),
        "kv_bytes_per_forward": nbytes - weight_bytes_per_forward(model),
        "forward_floor_ms": per_forward * 1e3,
        "forward_measured_ms": measured * 1e3,
        "measured_over_floor": measured / per_forward,
        "decode_floor_s": per_forward * forwards,
        "achieved_bandwidth_gbps": nbytes * forwards / seconds_decode / 1e9 if seconds_decode > 0 else float("nan"),
    }
