"""The fixed-shape decode state of block diffusion: one static KV cache per batch bucket, block positions held in
device tensors, and the denoise step and the commit captured as CUDA graphs ONCE per loaded model and shape.

gpt-fast's pattern, applied to blocks: everything a step needs lives at a fixed address, so a graph captured for
``(batch bucket, block length, cache length, kind)`` replays for every step, block and request of that shape.

- The cache holds ``bucket(B)`` rows of ``pow2(prompt + completion)`` slots (grow-only: a longer call reallocates
  it and drops the graphs that pointed at the old one). Rows past the call's batch are inert fillers.
- ``starts`` int64 [bucket] says where each row's current block begins and ``pad`` where its valid prefix begins;
  the step reads both on the device (:class:`~nemotron_fast.model.layers.BlockSlots`), so no Python int that
  changes between blocks is baked into a graph. The commit advances ``starts`` by ``L`` on the device.
- The step functions copy the block into a static buffer, run the backbone and the head over all ``bucket * L``
  positions (a fixed shape) and leave their outputs in static tensors.

All graphs of a model share one memory pool, so a graph's outputs are valid only until another graph replays:
the loop reads each step's outputs (x0/conf, the commit's logits) before it replays the next one.

On CUDA at temperature 0 the steps are replayed graphs; everywhere else (the CPU, ``temperature > 0``,
``use_cuda_graphs=False``) the same step functions run eagerly. :attr:`StaticDecode.captures` counts the
captures, so tests can check that a second call of the same shape captures nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.head_confidence import head_confidence_argmax
from ..model import KVCache, NLDModel

__all__ = ["StaticDecode", "DecodeBuffers", "batch_bucket", "static_decode"]

_MIN_SLOTS = 256


def batch_bucket(batch: int) -> int:
    """The batch size a call of ``batch`` rows runs at: the next power of two (1, 2, 4, 8, ...)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


def _slots_for(need: int) -> int:
    return max(_MIN_SLOTS, 1 << (need - 1).bit_length())


@dataclass
class DecodeBuffers:
    """The static tensors of one batch bucket (see the module docstring)."""

    cache: KVCache  # k, v [layers, bucket, Hkv, slots, D]; cache.pad is the static pad tensor
    starts: torch.Tensor  # int64 [bucket]
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block length -> int64 [bucket, L]

    @property
    def bucket(self) -> int:
        return self.cache.batch

    def block(self, length: int) -> torch.Tensor:
        if length not in self.blocks:
            self.blocks[length] = torch.zeros(self.bucket, length, dtype=torch.long, device=self.starts.device)
        return self.blocks[length]

    def view(self, batch: int, pad: torch.Tensor) -> KVCache:
        """The first ``batch`` rows as a :class:`KVCache` (views, so the prefill writes into the static cache)."""
        return KVCache(self.cache.k[:, :batch], self.cache.v[:, :batch], pad, 0, bool((pad != 0).any()))


class _Graph:
    """A captured step: replay it, read its static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: tuple[torch.Tensor, ...]) -> None:
        self.graph, self.outputs = graph, outputs

    def __call__(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


class StaticDecode:
    """Static buffers and captured step functions of one model (``static_decode(model)`` keeps one per model)."""

    def __init__(self, model: NLDModel) -> None:
        self.model = model
        self.captures = 0
        self._buffers: dict[int, DecodeBuffers] = {}
        self._steps: dict[tuple, Callable[[], tuple[torch.Tensor, ...]]] = {}
        self._pool: object | None = None

    # ---- buffers ---------------------------------------------------------------------------------------------
    def buffers(self, batch: int, need: int, *, bucketed: bool = True) -> DecodeBuffers:
        """Buffers for ``batch`` rows needing ``need`` cache slots (grow-only per bucket)."""
        bb = batch_bucket(batch) if bucketed else batch
        buf = self._buffers.get(bb)
        if buf is None or buf.cache.max_len < need:
            if buf is not None:  # the graphs of this bucket point at the old cache
                self._steps = {k: v for k, v in self._steps.items() if k[0] != bb}
                del self._buffers[bb]
            m = self.model
            cache = m.new_cache(bb, _slots_for(need))
            buf = DecodeBuffers(cache, torch.zeros(bb, dtype=torch.long, device=m.device))
            self._buffers[bb] = buf
        return buf

    def release(self) -> None:
        """Drop every buffer and graph (the memory goes back to torch's allocator)."""
        self._buffers.clear()
        self._steps.clear()
        self._pool = None

    # ---- steps -----------------------------------------------------------------------------------------------
    def denoise_fn(self, buf: DecodeBuffers, length: int, *, exclude_id: int | None, graphs: bool
                   ) -> Callable[[], tuple[torch.Tensor, ...]]:
        """The fixed-shape denoise step of ``buf``'s block buffer -> (x0 int64 [bucket, L], conf [bucket, L])."""
        model, block = self.model, buf.block(length)
        mask_id = model.config.mask_token_id

        def step() -> tuple[torch.Tensor, ...]:
            hidden = model.forward_hidden(model.embed(block), cache=buf.cache, starts=buf.starts, mode="diffusion")
            b, n = block.shape
            tok, c = head_confidence_argmax(hidden.view(b * n, -1), model.diffusion_head.weight, exclude_id=exclude_id)
            is_mask = block == mask_id
            return (torch.where(is_mask, tok.view(b, n), block),
                    torch.where(is_mask, c.view(b, n).to(model.dtype), float("-inf")))

        return self._get(("denoise", buf.bucket, length, buf.cache.max_len, exclude_id), step, graphs)

    def commit_fn(self, buf: DecodeBuffers, length: int, *, graphs: bool) -> Callable[[], tuple[torch.Tensor, ...]]:
        """The fixed-shape commit of ``buf``'s block buffer: causal K/V into the block's slots, ``starts += L``
        -> (logits of each row's last block position [bucket, V],)."""
        model, block = self.model, buf.block(length)

        def step() -> tuple[torch.Tensor, ...]:
            hidden = model.forward_hidden(model.embed(block), cache=buf.cache, starts=buf.starts, mode="causal")
            buf.starts.add_(length)
            return (model.head(hidden[:, -1]),)

        return self._get(("commit", buf.bucket, length, buf.cache.max_len), step, graphs)

    def _get(self, key: tuple, step: Callable[[], tuple[torch.Tensor, ...]], graphs: bool
             ) -> Callable[[], tuple[torch.Tensor, ...]]:
        if not graphs:
            return step
        key = (key[1], *key)  # bucket first, for dropping a bucket's graphs
        fn = self._steps.get(key)
        if fn is None:
            fn = self._capture(step)
            self._steps[key] = fn
        return fn

    def _capture(self, step: Callable[[], tuple[torch.Tensor, ...]]) -> Callable[[], tuple[torch.Tensor, ...]]:
        self.captures += 1
        if not self.model.device.type == "cuda":
            return step  # the bookkeeping without a device: the "graph" is the eager step
        starts = [b.starts.clone() for b in self._buffers.values()]
        try:
            # warm-up on a side stream: allocator, Triton compiles and autotuning happen outside the capture; an
            # error here is a real one (not a capture limitation) and propagates
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: CUDA work another thread of the process does meanwhile does not void the capture
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    outputs = step()
            except RuntimeError as exc:  # capture unsupported here: the eager step is the same computation
                warnings.warn(f"CUDA graph capture failed ({exc}); running the step eagerly", stacklevel=3)
                return step
        finally:
            # the warm-up and the capture ran the step: undo their side effects on the block positions (the K/V
            # they wrote land in slots the real step overwrites)
            for b, s in zip(self._buffers.values(), starts):
                b.starts.copy_(s)
        return _Graph(graph, outputs)


def static_decode(model: NLDModel) -> StaticDecode:
    """The model's :class:`StaticDecode` (created on first use, kept for the model's lifetime)."""
    sd = getattr(model, "_static_decode", None)
    if sd is None or sd.model is not model:
        sd = StaticDecode(model)
        model._static_decode = sd  # type: ignore[attr-defined]
    return sd
