"""The serving engine: one loaded model, a fixed set of batch slots, continuous batching at block boundaries.

Block diffusion has a natural scheduling point: the block boundary. Between the commit of one block and the first
denoise step of the next, a row holds nothing but its KV cache and its next seed token, so that is where the
engine admits waiting requests into free slots, drops finished and aborted ones, and streams each row's newly
committed block. Inside a block, the rows that share a block length step together: one forward for all of them
per denoise step, each row revealing by its own threshold and step budget, stopping at its own EOS.

- **Slots.** ``max_batch`` rows of one static KV cache (:class:`~nemotron_fast.model.KVCache`), grown when a
  request needs more slots. Each row sits at its own cache position: its block's slots and its valid prefix are
  device tensors (``starts``), read by the attention on the device, so rows admitted at different times share a
  forward. A forward covers the slots up to the highest busy one; free slots and rows of other block lengths in
  that range are inert fillers (their writes land in their own scratch slots).
- **Per-row parameters.** Threshold, steps per block, max tokens, EOS ids, temperature and seed, and the mode:
  ``ar`` and ``linear_spec`` requests run whole through :func:`nemotron_fast.generate` when admitted (their own
  loops have no block boundary to share), rows of different block lengths in separate groups.
- **Batch invariance.** Every request's tokens and NFE equal its run alone (``nemotron_fast.generate`` at batch
  1): nothing of a row depends on its neighbours (attention is per row, selection per row, noise per row).
- **Failure isolation.** A request whose admission fails (bad input, vision tower error) fails alone. If a
  shared step raises, the block is re-run one row at a time from its start, so only the rows that fail alone
  fail; their neighbours continue with the same results.
- **Streaming and abort.** Each committed block produces an :class:`EngineOutput` per row (the tokens so far and
  the new ones); ``abort(id)`` frees the row's slot at the next boundary.

Drive it with :meth:`Engine.step` from one thread, or :meth:`Engine.start` a background thread and use
:meth:`Engine.submit` / :meth:`Engine.stream` / :meth:`Engine.result` from any thread or event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from .generate import _even_k, _seed_tokens, prefill, select
from .kernels.head_confidence import head_confidence_argmax
from .model import KVCache, NLDModel
from .sampling import NoiseSource, SamplingPolicy, Schedule, check_mode, resolve_schedule

__all__ = ["Engine", "EngineRequest", "EngineOutput"]

logger = logging.getLogger("nemotron_fast.engine")


@dataclass
class EngineRequest:
    """One generation request. The numbers mean what they mean for :func:`nemotron_fast.generate` at batch 1
    (``steps`` is the total over all blocks, ``None`` = ``block_length`` per block). ``solo`` runs the request
    with no neighbour (the server sets it for a request that already crashed a worker once)."""

    input_ids: Sequence[int] | torch.Tensor
    max_new_tokens: int
    block_length: int = 32
    steps: int | None = None
    threshold: float | None = 0.9
    temperature: float = 0.0
    seed: int | None = None
    eos_token_id: int | Sequence[int] | None = None
    mode: str = "diffusion"
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    request_id: str | None = None
    solo: bool = False


@dataclass(frozen=True)
class EngineOutput:
    """What a request has produced so far. ``token_ids`` is the completion so far (final: cut at the first EOS
    and to ``max_new_tokens``, as the request's run alone returns it), ``new_token_ids`` what this output adds.
    ``finish_reason`` is None while running, else ``"stop"`` (EOS), ``"length"``, ``"abort"`` or ``"error"``
    (``error`` holds the exception). ``nfe`` counts the request's own forwards after its prefill."""

    request_id: str
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    nfe: int
    error: BaseException | None = None


OutputCallback = Callable[[EngineOutput], None]


@dataclass
class _Row:
    rid: str
    req: EngineRequest
    ids: torch.Tensor  # int64 [P]
    sched: Schedule
    eos: list[int]
    noise: NoiseSource | None
    slot: int = -1
    offset: int = 0  # cache slots its prompt takes (its admission batch's longest prompt; left-padded)
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    blocks_done: int = 0
    nfe: int = 0


class Engine:
    """See the module docstring. ``policy`` applies to every request (``per_row_eos`` is implied: each request
    stops at its own EOS); ``max_batch`` is the number of slots."""

    def __init__(self, model: NLDModel, *, max_batch: int = 8, policy: SamplingPolicy | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.model, self.max_batch = model, max_batch
        self.policy = policy or SamplingPolicy()
        self._exclude = model.config.mask_token_id if self.policy.exclude_mask else None
        self._lock = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._aborts: set[str] = set()
        self._slots: list[_Row | None] = [None] * max_batch
        self._final: dict[str, EngineOutput] = {}  # finals of requests without a callback, until result() reads them
        self._callbacks: dict[str, OutputCallback] = {}
        self._ids = itertools.count()
        self._cache: KVCache | None = None
        dev = model.device
        self._starts = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._pad = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._running = False  # the background thread may still run a round (until its loop has ended)
        #: Forward passes run so far (prefills included), and the largest number of rows one forward carried.
        self.forwards = 0
        self.max_rows_per_forward = 0

    # ---- the public surface ------------------------------------------------------------------------------------
    def submit(self, request: EngineRequest, on_output: OutputCallback | None = None) -> str:
        """Queue a request (validated now: a bad one raises ValueError here) -> its id. ``on_output`` is called,
        on the engine's thread, with each :class:`EngineOutput` of this request (an exception it raises is logged,
        never raised into the round); without it the final output is kept for :meth:`result`."""
        row = self._make_row(request)
        with self._lock:
            if row.rid in self._final or row.rid in self._callbacks or any(r.rid == row.rid for r in self._all_rows()):
                raise ValueError(f"request id {row.rid!r} is already in use")
            if on_output is not None:
                self._callbacks[row.rid] = on_output
            self._waiting.append(row)
            self._lock.notify_all()
        return row.rid

    def abort(self, request_id: str) -> bool:
        """Stop a request at the next block boundary (its slot is freed) -> False if it is unknown or finished."""
        with self._lock:
            if not any(r.rid == request_id for r in self._all_rows()):
                return False
            self._aborts.add(request_id)
            self._lock.notify_all()
            return True

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting) or any(r is not None for r in self._slots)

    def result(self, request_id: str, timeout: float | None = None) -> EngineOutput:
        """The request's final output, waiting for it (drives :meth:`step` itself when no thread was started)."""
        while True:
            with self._lock:
                if request_id in self._final:
                    return self._final.pop(request_id)
                if not any(r.rid == request_id for r in self._all_rows()):
                    raise KeyError(f"unknown request id {request_id!r}")
                if self._running:
                    if not self._lock.wait(timeout):
                        raise TimeoutError(f"request {request_id!r} did not finish in {timeout} s")
                    continue
            self.step()

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Submit ``request`` and yield its outputs as blocks commit (needs :meth:`start`)."""
        if self._thread is None:
            raise RuntimeError("stream() needs the engine's thread: call start() first")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()

        def deliver(out: EngineOutput) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the consumer's event loop is closed: nobody reads this stream any more
                pass

        rid = self.submit(request, on_output=deliver)
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.abort(rid)  # a consumer that stops early frees the slot

    def start(self) -> None:
        """Run :meth:`step` on a background thread whenever there is work (after a stop() whose wait ended
        first, once that thread has finished its block)."""
        if self._thread is not None:
            if self._thread.is_alive() and not self._stop.is_set():
                return
            self._thread.join()  # a stopping thread ends after its block: never two rounds at once
        self._stop.clear()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="nemotron-fast-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the background thread after its current block (queued and running requests stay in place)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def step(self) -> list[EngineOutput]:
        """One scheduling round: aborts, admissions into free slots, then one block for every group of rows that
        share a block length. Returns the outputs it produced (also sent to each request's callback)."""
        outputs: list[EngineOutput] = []
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            for row in [r for r in self._waiting if r.rid in aborts]:
                self._waiting.remove(row)
                outputs.append(self._finish(row, "abort"))
            for row in self._busy():
                if row.rid in aborts:
                    outputs.append(self._finish(row, "abort"))
            admitted = self._take_admissions()
        outputs += self._admit_all(admitted)
        groups: dict[int, list[_Row]] = {}
        for row in self._busy():
            groups.setdefault(row.sched.block_length, []).append(row)
        for length, rows in sorted(groups.items()):
            outputs += self._run_block_isolated(rows, length)
        self._publish(outputs)
        return outputs

    # ---- admission ----------------------------------------------------------------------------------------------
    def _make_row(self, req: EngineRequest) -> _Row:
        check_mode(req.mode)
        sched = resolve_schedule(req.max_new_tokens, req.block_length, req.steps if req.mode == "diffusion" else None)
        if req.threshold is not None and not 0.0 <= req.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] or None, got {req.threshold}")
        if req.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {req.temperature}")
        ids = torch.as_tensor(req.input_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("input_ids must hold at least one token")
        cfg = self.model.config
        eos = cfg.eos_token_ids if req.eos_token_id is None else (
            (req.eos_token_id,) if isinstance(req.eos_token_id, int) else tuple(req.eos_token_id))
        rid = req.request_id or f"req-{next(self._ids)}"
        noise = NoiseSource(req.seed) if req.temperature > 0 else None
        return _Row(rid, req, ids, sched, [int(e) for e in eos], noise)

    def _take_admissions(self) -> list[_Row]:
        """Pop waiting rows into free slots (called under the lock). A solo request waits for an empty engine and
        keeps it to itself."""
        out: list[_Row] = []
        busy = self._busy()
        if any(r.req.solo for r in busy):
            return out
        while self._waiting and None in self._slots:
            nxt = self._waiting[0]
            if nxt.req.solo and (busy or out):
                break
            self._waiting.popleft()
            nxt.slot = self._slots.index(None)
            self._slots[nxt.slot] = nxt
            out.append(nxt)
            if nxt.req.solo:
                break
        return out

    def _admit_all(self, rows: list[_Row]) -> list[EngineOutput]:
        """Admit the rows popped into free slots: non-diffusion requests run whole, the diffusion ones are
        prefilled together (one vision tower call, one left-padded prefill); if that batch fails, each row is
        admitted alone, so only a failing row fails."""
        outputs: list[EngineOutput] = []
        for row in [r for r in rows if r.req.mode != "diffusion"]:
            outputs += self._admit(row)
        rows = [r for r in rows if r.req.mode == "diffusion"]
        if len(rows) > 1:
            try:
                self._prefill_together(rows)
                return outputs
            except Exception:  # noqa: BLE001 - isolated below, row by row
                pass
        for row in rows:
            outputs += self._admit(row)
        return outputs

    def _prefill_together(self, rows: list[_Row]) -> None:
        m, dev = self.model, self.model.device
        width = max(r.ids.numel() for r in rows)
        for r in rows:
            r.offset = width
        self._ensure_cache()
        assert self._cache is not None
        fill = m.config.pad_token_id if m.config.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - r.ids.numel():] = r.ids
        pad = torch.tensor([width - r.ids.numel() for r in rows], dtype=torch.long, device=dev)
        with_images = [r for r in rows if r.req.pixel_values is not None]
        feats = None
        if with_images:
            if any(r.req.image_sizes is None for r in with_images):
                raise ValueError("pixel_values need image_sizes")
            h = max(r.req.pixel_values.shape[-2] for r in with_images)  # type: ignore[union-attr]
            w = max(r.req.pixel_values.shape[-1] for r in with_images)  # type: ignore[union-attr]
            pix = torch.cat([torch.nn.functional.pad(r.req.pixel_values.to(dev), (0, w - r.req.pixel_values.shape[-1],
                                                                                0, h - r.req.pixel_values.shape[-2]))
                             for r in with_images])  # type: ignore[union-attr]
            feats = m.image_features(pix, torch.cat([r.req.image_sizes.to(dev) for r in with_images]))  # type: ignore
        tmp = m.new_cache(len(rows), width, pad=pad)
        _, last = prefill(m, ids.to(dev), pad, 0, feats, cache=tmp)
        self.forwards += 1
        slots = torch.tensor([r.slot for r in rows], device=dev)
        self._cache.k[:, slots, :, :width] = tmp.k
        self._cache.v[:, slots, :, :width] = tmp.v
        self._starts[slots] = width
        self._pad[slots] = pad
        for i, r in enumerate(rows):
            r.seed = int(_seed_tokens(last[i:i + 1], r.req.temperature, r.noise, self._exclude)[0])

    def _admit(self, row: _Row) -> list[EngineOutput]:
        """Prefill ``row`` alone into its slot (or run a non-diffusion request whole) -> outputs."""
        try:
            if row.req.mode != "diffusion":
                return [self._run_other_mode(row)]
            row.offset = row.ids.numel()
            self._ensure_cache()
            assert self._cache is not None
            m, s = self.model, row.slot
            feats = None
            if row.req.pixel_values is not None:
                if row.req.image_sizes is None:
                    raise ValueError("pixel_values need image_sizes")
                feats = m.image_features(row.req.pixel_values.to(m.device), row.req.image_sizes.to(m.device))
            zero = torch.zeros(1, dtype=torch.long, device=m.device)
            view = KVCache(self._cache.k[:, s:s + 1], self._cache.v[:, s:s + 1], zero, 0, False)
            _, last = prefill(m, row.ids.to(m.device)[None], zero, row.sched.gen_length, feats, cache=view)
            self.forwards += 1
            row.seed = int(_seed_tokens(last, row.req.temperature, row.noise, self._exclude)[0])
            self._starts[s] = row.ids.numel()
            self._pad[s] = 0
        except Exception as exc:  # this request's failure is its own
            with self._lock:
                return [self._finish(row, "error", exc)]
        return []

    def _run_other_mode(self, row: _Row) -> EngineOutput:
        from .generate import generate

        r = row.req
        res = generate(self.model, row.ids[None].to(self.model.device), r.pixel_values, r.image_sizes,
                       max_new_tokens=r.max_new_tokens, block_length=r.block_length, threshold=r.threshold,
                       temperature=r.temperature, seed=r.seed, eos_token_id=row.eos, policy=self.policy, mode=r.mode)
        self.forwards += res.forwards
        row.tokens, row.nfe = res.completion_ids[0], res.nfe
        hit_eos = bool(row.tokens) and row.tokens[-1] in row.eos
        with self._lock:
            return self._finish(row, "stop" if hit_eos else "length", new=row.tokens)

    def _ensure_cache(self) -> None:
        """Grow the static cache so every busy row fits its completion plus any group's block of scratch."""
        busy = self._busy()
        need = max(max(r.offset, r.ids.numel()) + r.sched.gen_length for r in busy) + \
            max(r.sched.block_length for r in busy)
        if self._cache is not None and self._cache.max_len >= need:
            return
        slots = 1 << (need - 1).bit_length()
        new = self.model.new_cache(self.max_batch, slots, pad=self._pad)
        if self._cache is not None:
            old = self._cache.max_len
            new.k[..., :old, :] = self._cache.k
            new.v[..., :old, :] = self._cache.v
        self._cache = new

    # ---- one block of one group ---------------------------------------------------------------------------------
    def _run_block_isolated(self, rows: list[_Row], length: int) -> list[EngineOutput]:
        snap = [(r.seed, r.nfe, r.noise.generator.get_state() if r.noise else None) for r in rows]
        starts = self._starts.clone()
        try:
            return self._run_block(rows, length)
        except Exception as exc:
            if len(rows) == 1:
                with self._lock:
                    return [self._finish(rows[0], "error", exc)]
        # a shared step failed: run each row's block alone from its start, so only failing rows fail
        outs: list[EngineOutput] = []
        for r, (seed, nfe, state) in zip(rows, snap):
            r.seed, r.nfe = seed, nfe
            self._starts[r.slot] = starts[r.slot]
            if r.noise is not None and state is not None:
                r.noise.generator.set_state(state)
            outs += self._run_block_isolated([r], length)
        return outs

    def _run_block(self, rows: list[_Row], length: int) -> list[EngineOutput]:
        assert self._cache is not None
        m = self.model
        mask_id, dev = m.config.mask_token_id, m.device
        hi = max(r.slot for r in rows) + 1
        slot_idx = torch.tensor([r.slot for r in rows], device=dev)
        member = torch.zeros(hi, dtype=torch.bool, device=dev)
        member[slot_idx] = True
        view = KVCache(self._cache.k[:, :hi], self._cache.v[:, :hi], self._pad[:hi], 0, False)
        starts = self._starts[:hi]
        block = torch.full((hi, length), mask_id, dtype=torch.long, device=dev)
        block[slot_idx, 0] = torch.tensor([r.seed for r in rows], device=dev)
        spb = torch.ones(hi, dtype=torch.long, device=dev)
        spb[slot_idx] = torch.tensor([r.sched.steps_per_block for r in rows], device=dev)
        n_eos = max(len(r.eos) for r in rows)
        eos = torch.full((hi, max(1, n_eos)), -1, dtype=torch.long, device=dev)
        for r in rows:
            eos[r.slot, :len(r.eos)] = torch.tensor(r.eos, dtype=torch.long, device=dev)
        n_masked = (block == mask_id).sum(1)
        by_select: dict[float | None, torch.Tensor] = {}
        for r in rows:
            by_select.setdefault(r.req.threshold, torch.zeros(hi, dtype=torch.bool, device=dev))[r.slot] = True
        stepping = member.clone()
        step = 0
        while True:
            stepping &= (block == mask_id).any(1) & (step < spb)
            if not bool(stepping.any()):
                break
            x0, conf = self._denoise(rows, view, starts, block, stepping)
            last_step = step == spb - 1
            for thr, in_group in by_select.items():
                act = stepping & in_group
                if self.policy.finish_last_step:
                    for force in (False, True):
                        sub = act & (last_step == force)
                        if bool(sub.any()):
                            select(x0, conf, block, mask_id, thr, _even_k(n_masked, spb, step), sub, force)
                elif bool(act.any()):
                    select(x0, conf, block, mask_id, thr, _even_k(n_masked, spb, step), act, False)
            for r, s in zip(rows, stepping[slot_idx].tolist()):
                r.nfe += int(s)
            stepping &= ~_eos_done_rows(block, mask_id, eos)
            step += 1
        hidden = m.forward_hidden(m.embed(block), cache=view, starts=starts, mode="causal")
        self._count(hi)
        logits = m.head(hidden[slot_idx, -1])
        toks = block[slot_idx].tolist()
        # every row's next seed before any row's state moves on: a row that raises here leaves the block re-runnable
        seeds = [int(_seed_tokens(logits[i:i + 1], r.req.temperature, r.noise, self._exclude)[0])
                 for i, r in enumerate(rows)]
        starts += member.long() * length
        outs: list[EngineOutput] = []
        for r, seed, tok in zip(rows, seeds, toks):
            r.nfe += 1
            r.seed = seed
            outs.append(self._after_commit(r, tok))
        return outs

    def _denoise(self, rows: list[_Row], view: KVCache, starts: torch.Tensor, block: torch.Tensor,
                 stepping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One diffusion forward of the group; the head runs on the masked positions of stepping rows, rows at
        T > 0 each with their own noise (drawn as their run alone draws it)."""
        m = self.model
        hi, length = block.shape
        hidden = m.forward_hidden(m.embed(block), cache=view, starts=starts, mode="diffusion")
        self._count(hi)
        want = (block == m.config.mask_token_id) & stepping[:, None]
        x0 = block.clone()
        conf = torch.full((hi, length), float("-inf"), dtype=m.dtype, device=block.device)
        flat_h = hidden.view(hi * length, -1)
        greedy = torch.zeros(hi, dtype=torch.bool, device=block.device)
        step_l = stepping.tolist()
        for r in rows:
            if r.req.temperature == 0:
                greedy[r.slot] = True
            elif step_l[r.slot]:
                u = r.noise.uniform((1, length, m.config.vocab_size), block.device)  # type: ignore[union-attr]
                pos = want[r.slot].nonzero().squeeze(1)
                if pos.numel():
                    tok, c = head_confidence_argmax(flat_h[r.slot * length + pos], m.diffusion_head.weight,
                                                    noise_u=u[0, pos], temperature=r.req.temperature,
                                                    exclude_id=self._exclude)
                    x0[r.slot, pos] = tok
                    conf[r.slot, pos] = c.to(conf.dtype)
        idx = (want & greedy[:, None]).flatten().nonzero().squeeze(1)
        if idx.numel():
            tok, c = head_confidence_argmax(flat_h[idx], m.diffusion_head.weight, exclude_id=self._exclude)
            x0.view(-1)[idx] = tok
            conf.view(-1)[idx] = c.to(conf.dtype)
        return x0, conf

    def _after_commit(self, row: _Row, block: list[int]) -> EngineOutput:
        before = len(row.tokens)
        row.tokens = row.tokens + block
        row.blocks_done += 1
        eos = set(row.eos)
        first = next((i for i, t in enumerate(row.tokens) if t in eos), None)
        cap = row.sched.max_new_tokens
        if first is not None or row.blocks_done == row.sched.num_blocks:
            row.tokens = row.tokens[:cap] if first is None else row.tokens[:min(first + 1, cap)]
            with self._lock:
                return self._finish(row, "stop" if first is not None and first < cap else "length",
                                    new=row.tokens[before:])
        return EngineOutput(row.rid, list(row.tokens), block, False, None, row.nfe)

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    def _count(self, rows: int) -> None:
        self.forwards += 1
        self.max_rows_per_forward = max(self.max_rows_per_forward, rows)

    def _busy(self) -> list[_Row]:
        return [r for r in self._slots if r is not None]

    def _all_rows(self) -> list[_Row]:
        return list(self._waiting) + self._busy()

    def _finish(self, row: _Row, reason: str, error: BaseException | None = None,
                new: list[int] | None = None) -> EngineOutput:
        """Free the row's slot and record its final output (called under the lock)."""
        if row.slot >= 0 and self._slots[row.slot] is row:
            self._slots[row.slot] = None
            self._starts[row.slot] = 0  # a free slot's filler writes stay at the cache's start
            self._pad[row.slot] = 0  # and its attention row is never empty
        out = EngineOutput(row.rid, list(row.tokens), list(new or []), True, reason, row.nfe, error)
        if row.rid not in self._callbacks:
            self._final[row.rid] = out
        self._lock.notify_all()
        return out

    def _publish(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            with self._lock:
                cb = (self._callbacks.pop if out.finished else self._callbacks.get)(out.request_id, None)
            if cb is not None:
                try:
                    cb(out)
                except Exception:  # the callback's failure is its consumer's: the other outputs still go out
                    logger.exception("the output callback of request %s raised", out.request_id)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    while not self._stop.is_set() and not (self._waiting or any(r is not None for r in self._slots)):
                        self._lock.wait()
                if self._stop.is_set():
                    return
                self.step()
        finally:
            with self._lock:  # result() callers waiting on this thread drive step() themselves now
                self._running = False
                self._lock.notify_all()


def _eos_done_rows(block: torch.Tensor, mask_id: int, eos: torch.Tensor) -> torch.Tensor:
    """Per row: the block has one of the row's EOS ids (``eos`` int64 [B, E], -1 = none) with no MASK before the
    first of them -> bool [B] (:func:`nemotron_fast.generate._eos_done` with per-row EOS sets)."""
    is_eos = (block[:, :, None] == eos[:, None, :]).any(-1)
    before_first = is_eos.int().cumsum(1) == 0
    return is_eos.any(1) & ~((block == mask_id) & before_first).any(1)
