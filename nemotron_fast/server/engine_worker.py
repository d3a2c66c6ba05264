"""The continuous-batching model worker (``--batching continuous``, the default): the server on the Engine.

One thread owns the model and drives a :class:`~nemotron_fast.engine.Engine`: it claims queued requests while the
engine has room, hands their input preparation (image fetch, validation, preprocessing) to a small thread pool so
the model never waits on I/O, submits prepared requests to the engine (which admits them into free slots at the
next block boundary) and runs the engine's rounds. Each committed block becomes a partial output and a log line;
a finished request's result is written at once, while its batch-mates go on.

Failures stay with their request: a bad input or a failing row completes with its own error. A request that
already interrupted a worker once (``attempts > 1``: the process died while it ran) runs with no neighbour. An
error that leaves the CUDA context unusable (an illegal access, a device-side assert) ends the process with
exit code 70, so the queue hands its requests to the next start (or another worker) instead of failing every
later request here.

Cancels and lost leases are checked before every round (the engine frees the slot at the next block); on
shutdown the running requests stop at their next block and go back to the queue. A request that asked for the
step stream (``stream_steps``) runs through ``Pipeline.run`` alone, between two rounds.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import errors
from ..engine import Engine, EngineOutput
from .steps import wants_steps
from .store import Outcome, RequestRow, cancelled_outcome
from .worker import ModelWorker, outcome_for_exception

__all__ = ["EngineWorker", "is_fatal_device_error", "FATAL_EXIT_CODE"]

logger = logging.getLogger("nemotron_fast.server")

#: Exit code of a worker whose CUDA context is poisoned (its supervisor restarts it; the queue re-runs requests).
FATAL_EXIT_CODE = 70

_FATAL_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS_EXECUTION_FAILED",
                  "CUDNN_STATUS_EXECUTION_FAILED", "unspecified launch failure")


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the CUDA context unusable (every later kernel would fail too)."""
    accel = getattr(__import__("torch"), "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FATAL_MARKERS)


@dataclass
class _Job:
    row: RequestRow
    future: Future | None = None
    prep: Any = None
    submitted: float = 0.0
    blocks: int = 0
    cancelling: bool = False


class EngineWorker(ModelWorker):
    """:class:`ModelWorker`'s interface (start, stop, alive, leases) over an :class:`Engine`; see the module
    docstring. ``max_batch`` is the number of engine slots; up to ``lookahead`` more requests are claimed and
    prepared ahead so a freed slot is filled at the next block boundary."""

    def __init__(self, pipeline: Any, store: Any, *, max_batch: int = 8, lookahead: int = 4,
                 prep_threads: int = 4, exit_on_fatal: bool = True, **kwargs: Any) -> None:
        super().__init__(pipeline, store, max_batch=max_batch, **kwargs)
        self.engine = Engine(pipeline.model, max_batch=self.max_batch, policy=pipeline.policy)
        self.lookahead = lookahead
        self.exit_on_fatal = exit_on_fatal
        self._pool = ThreadPoolExecutor(max_workers=prep_threads, thread_name_prefix="nemotron-fast-prep")
        self._jobs: dict[str, _Job] = {}
        self._maybe_more = True  # the last claim filled its room: more may be queued
        self._next_poll = 0.0  # when to look at the queue anyway (expired leases of other workers)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._tick()
                except Exception as exc:
                    self._crashed(exc)
        finally:
            self._shutdown()

    def _tick(self) -> None:
        claimed = self._claim()
        self._submit_prepared()
        self._check_cancels()
        if self.engine.has_work():
            self.engine.step()  # outputs arrive through _on_output, on this thread
            return
        if self._jobs:  # only preparations in flight: wait for one to finish (or for a queue change)
            pending = [j.future for j in self._jobs.values() if j.future is not None]
            if pending:
                from concurrent.futures import FIRST_COMPLETED, wait

                wait(pending, timeout=self.store.idle_wait, return_when=FIRST_COMPLETED)
            return
        if not claimed:
            # A queue change wakes it; the timeout bounds how late an expired lease is noticed.
            self.store.queue_changed.wait(self.store.idle_wait)

    def _claim(self) -> int:
        """Claim while the engine has room, and only when the queue may hold something: a submit since the last
        look, a last claim that filled its room, or ``idle_wait`` passed (a claim is a write transaction)."""
        room = self.max_batch + self.lookahead - len(self._jobs)
        now = time.monotonic()
        if room <= 0 or not (self.store.queue_changed.is_set() or self._maybe_more or now >= self._next_poll):
            return 0
        self._next_poll = now + self.store.idle_wait
        try:
            rows = self.store.claim_batch(room, worker_id=self.worker_id)
        except Exception:  # a locked/busy/unreachable database must not kill the worker
            logger.exception("claiming requests failed")
            self._stop.wait(0.5)
            return 0
        self._maybe_more = len(rows) == room
        if not rows:
            return 0
        self.batch_sizes.append(len(rows))
        self.leases.hold(rows)
        for row in rows:
            if wants_steps(row.input):
                # the live step view reports one request's steps: it runs alone, between two rounds
                try:
                    self.run_rows([row])
                finally:
                    self.leases.release(row.id)
                continue
            job = _Job(row)
            job.future = self._pool.submit(self.pipeline.prepare, self._inputs(row),
                                           allow_private_urls=self.allow_private_urls, allow_local_files=True)
            self._jobs[row.id] = job
        return len(rows)

    def _submit_prepared(self) -> None:
        for rid, job in list(self._jobs.items()):
            if job.future is None or not job.future.done():
                continue
            fut, job.future = job.future, None
            try:
                job.prep = fut.result()
                if job.row.attempts > 1:
                    self.store.log(rid, "WARN", f"attempt {job.row.attempts}: an earlier run of this request "
                                                "interrupted its worker, so it runs with no neighbour")
                req = self.pipeline.engine_request(job.prep, rid, solo=job.row.attempts > 1)
                job.submitted = time.perf_counter()
                self.engine.submit(req, on_output=self._on_output)
                p = job.prep.params
                self.store.log(rid, "INFO", f"prompt: {job.prep.proc.num_prompt_tokens} tokens; " + (
                    f"{p.num_blocks} blocks of {p.block_length}, {p.steps_per_block} steps each"
                    if p.mode == "diffusion" else f"mode {p.mode}, up to {p.max_tokens} tokens"))
            except Exception as exc:  # this request's input failed: it alone completes with the error
                self._done(job, outcome_for_exception(exc), 0.0)

    def _check_cancels(self) -> None:
        """Abort requests that were cancelled or whose lease was lost (both in-memory checks)."""
        for rid, job in list(self._jobs.items()):
            if job.cancelling or job.future is not None:
                continue
            if self.store.cancel_requested(rid) or self.leases.lost(rid):
                job.cancelling = True
                self.engine.abort(rid)

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _on_output(self, out: EngineOutput) -> None:
        job = self._jobs.get(out.request_id)
        if job is None:
            return
        try:
            self._handle_output(job, out)
        except Exception as exc:  # turning this output into a result failed: the request fails alone
            logger.exception("request %s: handling its output failed", out.request_id)
            if out.finished and self._jobs.get(out.request_id) is job:
                self._done(job, outcome_for_exception(exc), time.perf_counter() - job.submitted)

    def _handle_output(self, job: _Job, out: EngineOutput) -> None:
        rid, elapsed = out.request_id, time.perf_counter() - job.submitted
        if not out.finished:
            job.blocks += 1
            if job.row.kind == "stream":  # only output streams read partial outputs
                self.store.set_partial(rid, self.pipeline.processor.decode(out.token_ids))
            self.store.log(rid, "INFO", f"Block {job.blocks} committed ({len(out.token_ids)} tokens so far)")
            return
        if out.finish_reason == "error":
            assert out.error is not None
            if is_fatal_device_error(out.error):
                self._fatal(out.error)
            if not isinstance(out.error, (errors.NemotronFastError, ValueError)):
                logger.error("request %s failed:\n%s", rid, "".join(
                    traceback.format_exception(type(out.error), out.error, out.error.__traceback__)))
            self._done(job, outcome_for_exception(out.error), elapsed)
        elif out.finish_reason == "abort":
            if self.leases.lost(rid):
                self._drop(job)  # another worker owns it now
            elif self.store.cancel_requested(rid):
                self._done(job, cancelled_outcome(), elapsed)
            else:  # shutting down: back to the queue
                self.store.requeue(rid, owner=job.row.lease_owner)
                self._drop(job)
        else:
            result = self.pipeline.engine_output(job.prep, out.token_ids, out.nfe, elapsed)
            self._log_usage(rid, result, elapsed)
            self._done(job, Outcome(200, result), elapsed)

    def _done(self, job: _Job, outcome: Outcome, elapsed: float) -> None:
        try:
            if not self.leases.lost(job.row.id):
                self._finish(job.row, outcome, elapsed)
        finally:
            self._drop(job)

    def _drop(self, job: _Job) -> None:
        self._jobs.pop(job.row.id, None)
        self.leases.release(job.row.id)

    # ---- failures and shutdown -------------------------------------------------------------------------------
    def _fatal(self, exc: BaseException) -> None:
        logger.critical("the CUDA context is unusable (%s: %s); exiting with code %d so the queue re-runs the "
                        "running requests after a restart", type(exc).__name__, exc, FATAL_EXIT_CODE)
        if self.exit_on_fatal:
            logging.shutdown()
            os._exit(FATAL_EXIT_CODE)
        raise SystemExit(FATAL_EXIT_CODE)

    def _crashed(self, exc: Exception) -> None:
        """The engine round itself raised (not one row): fatal device errors end the process; anything else fails
        the requests in flight with a 500 and the worker goes on."""
        if is_fatal_device_error(exc):
            self._fatal(exc)
        logger.exception("engine round failed")
        for job in list(self._jobs.values()):
            if job.future is None:
                self.engine.abort(job.row.id)
                self._done(job, Outcome(500, {"detail": "Internal server error", "error_type": "internal_error"},
                                        "Internal server error", "internal_error"), 0.0)
        self.engine = Engine(self.pipeline.model, max_batch=self.max_batch, policy=self.pipeline.policy)

    def _shutdown(self) -> None:
        """Stop: running requests stop at their next block and go back to the queue, prepared ones too."""
        for rid, job in list(self._jobs.items()):
            if job.future is not None:
                job.future.cancel()
                self.store.requeue(rid, owner=job.row.lease_owner)
                self._drop(job)
            else:
                self.engine.abort(rid)
        while self._jobs and self.engine.has_work():
            self.engine.step()
        self._pool.shutdown(wait=False, cancel_futures=True)
