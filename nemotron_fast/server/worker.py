"""The model worker: takes queued requests in batches and runs them through the pipeline.

One thread owns the model. It claims up to ``max_batch`` queued requests at a time (oldest first) and runs
them as one batched generation with ``Pipeline.run_batch``; a single request (and every streamed one) goes
through ``Pipeline.run`` instead, which reports each committed block (partial output and a log line). Cancels
are polled after every block; on shutdown the running requests stop at their next block and go back to the
queue, so a restart runs them again. A request that opts in to the step stream (``"stream_steps": true``) runs
alone and records its denoise steps in the ``StepLog`` (see :mod:`nemotron_fast.server.steps`).

Claims are leased (``store.Store``): a ``LeaseKeeper`` thread renews the leases of the requests this worker
runs. A request whose lease was lost (this process stalled or lost the database longer than the lease, and
another worker took it) stops at its next block and its result is never written: ``finish`` takes the claim
token back and writes only while it still holds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from .. import errors
from .steps import STEPS_FIELD, StepLog, wants_steps
from .store import Outcome, RequestRow, Store, cancelled_outcome

__all__ = ["PipelineLike", "ModelWorker", "LeaseKeeper", "Cancelled", "outcome_for_exception", "default_worker_id"]

logger = logging.getLogger("nemotron_fast.server")

# The pipeline raises ``errors.Cancelled`` when ``should_cancel()`` turns true; tolerate an errors module that
# predates it.
Cancelled: type[Exception] = getattr(errors, "Cancelled", None) or type(
    "Cancelled", (errors.NemotronFastError,), {"__doc__": "The request was cancelled between two blocks."}
)


class PipelineLike(Protocol):
    """What the server needs from ``nemotron_fast.pipeline.Pipeline``."""

    def validate(self, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def run(self, inputs: dict[str, Any], *, on_progress: Callable[[str], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, allow_private_urls: bool = False,
            allow_local_files: bool = False, log: Callable[[str], None] | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]: ...

    def run_batch(self, inputs: list[dict[str, Any]], *, allow_private_urls: bool = False,
                  allow_local_files: bool = False,
                  should_cancel: list[Callable[[], bool]] | None = None) -> list[dict[str, Any] | Exception]: ...


def outcome_for_exception(exc: BaseException) -> Outcome:
    """Map a pipeline exception to the status and body the request's result endpoint returns."""
    if isinstance(exc, errors.InputValidationError):
        return Outcome(422, {"detail": exc.errors}, str(exc), "validation_error")
    if isinstance(exc, Cancelled):
        return cancelled_outcome()
    if isinstance(exc, (errors.NemotronFastError, ValueError)):
        return Outcome(400, {"detail": str(exc)}, str(exc), "bad_request")
    message = f"Generation failed: {type(exc).__name__}: {exc}"
    return Outcome(500, {"detail": message, "error_type": "internal_error"}, message, "internal_error")


def default_worker_id() -> str:
    """``host:pid:random``: unique per process, readable in logs and in the ``worker_id`` column."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class LeaseKeeper:
    """Renews the leases of the requests a worker holds, every third of the lease; remembers the lost ones.

    Does nothing when the store's leases never expire (SQLite: the process is the only worker).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: dict[str, str] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.store.lease_ttl is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nemotron-fast-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def hold(self, rows: list[RequestRow]) -> None:
        with self._lock:
            for row in rows:
                if row.lease_owner is not None:
                    self._held[row.id] = row.lease_owner

    def release(self, request_id: str) -> None:
        with self._lock:
            self._held.pop(request_id, None)
            self._lost.discard(request_id)

    def lost(self, request_id: str) -> bool:
        return request_id in self._lost

    def renew(self) -> None:
        """One renewal round (the thread calls it; public for tests)."""
        with self._lock:
            held = dict(self._held)
        kept = self.store.renew_leases(held)
        with self._lock:
            for request_id in held:
                if request_id not in kept and request_id in self._held:
                    logger.warning("lost the lease of request %s: it stops and its result is not written",
                                   request_id)
                    self._lost.add(request_id)

    def _loop(self) -> None:
        assert self.store.lease_ttl is not None
        while not self._stop.wait(self.store.lease_ttl / 3):
            try:
                self.renew()
            except Exception:  # the database is unreachable: keep trying until the lease runs out
                logger.exception("renewing leases failed")


class ModelWorker:
    """Background thread that drains the request queue through one pipeline."""

    def __init__(self, pipeline: PipelineLike, store: Store, *, max_batch: int = 8,
                 allow_private_urls: bool = False,
                 resolve_local: Callable[[str], str | None] | None = None, worker_id: str | None = None,
                 steps: StepLog | None = None) -> None:
        self.pipeline = pipeline
        self.store = store
        self.steps = steps
        self.max_batch = max(1, int(max_batch))
        self.allow_private_urls = allow_private_urls
        self.resolve_local = resolve_local
        self.worker_id = worker_id or default_worker_id()
        self.leases = LeaseKeeper(store)
        self.batch_sizes: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self.leases.start()
        self._thread = threading.Thread(target=self._loop, name="nemotron-fast-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running batch reaches its next block; its requests go back to the queue."""
        self._stop.set()
        self.store.queue_changed.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None
        self.leases.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                rows = self.store.claim_batch(self.max_batch, worker_id=self.worker_id)
            except Exception:  # a locked/busy/unreachable database must not kill the worker
                logger.exception("claiming a batch failed")
                self._stop.wait(0.5)
                continue
            if not rows:
                # A queue change wakes it; the timeout bounds how late an expired lease is noticed.
                self.store.queue_changed.wait(self.store.idle_wait)
                continue
            self.batch_sizes.append(len(rows))
            self.leases.hold(rows)
            try:
                self.run_rows(rows)
            except Exception:
                logger.exception("worker batch failed")
                for row in rows:
                    try:
                        self._finish(row, Outcome(500, {"detail": "Internal server error",
                                                        "error_type": "internal_error"},
                                                  "Internal server error", "internal_error"), 0.0)
                    except Exception:  # the store is unreachable: the lease runs out and the request runs again
                        logger.exception("recording the failure of %s failed", row.id)
            finally:
                for row in rows:
                    self.leases.release(row.id)

    def _inputs(self, row: RequestRow) -> dict[str, Any]:
        inputs = dict(row.input)
        inputs.pop(STEPS_FIELD, None)
        url = inputs.get("image_url")
        if self.resolve_local is not None and isinstance(url, str):
            local = self.resolve_local(url)
            if local is not None:
                # The server's own uploads are read from its data dir, not fetched over HTTP (no URL check). The
                # only paths the pipeline sees (allow_local_files) are these: a caller's image_url passed
                # NemotronInput's http(s)/data: rule at submit, and inputs that failed it never reach the queue.
                inputs["image_url"] = local
        return inputs

    def _should_cancel(self, request_id: str) -> Callable[[], bool]:
        return lambda: (self._stop.is_set() or self.store.cancel_requested(request_id)
                        or self.leases.lost(request_id))

    def _user_cancel(self, request_id: str) -> Callable[[], bool]:
        return lambda: self.store.cancel_requested(request_id) or self.leases.lost(request_id)

    def run_rows(self, rows: list[RequestRow]) -> None:
        """Run claimed requests (one batched generation, or one ``run`` with progress for a single row)."""
        if len(rows) > 1 and any(wants_steps(row.input) for row in rows):
            # a request that streams its steps runs alone (the sampler reports steps for one row)
            for row in rows:
                if wants_steps(row.input):
                    self.run_rows([row])
            rest = [row for row in rows if not wants_steps(row.input)]
            if rest:
                self.run_rows(rest)
            return
        started = time.perf_counter()
        inputs = [self._inputs(row) for row in rows]
        results: list[dict[str, Any] | BaseException]
        if len(rows) == 1:
            results = [self._run_one(rows[0], inputs[0])]
        else:
            try:
                # Only user cancels here: a batch may check them only once it is done, and a shutdown must not
                # throw away finished rows (it waits for the batch instead).
                results = list(self.pipeline.run_batch(
                    inputs, allow_private_urls=self.allow_private_urls, allow_local_files=True,
                    should_cancel=[self._user_cancel(row.id) for row in rows]))
                if len(results) != len(rows):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(rows)} inputs")
            except Exception as exc:
                # One bad row must not fail its neighbours: isolate by running each alone.
                logger.warning("batched generation failed (%s); running the %d rows one by one", exc, len(rows))
                results = [self._run_one(row, inp) for row, inp in zip(rows, inputs)]
        elapsed = time.perf_counter() - started
        for row, result in zip(rows, results):
            if self.leases.lost(row.id):
                continue  # another worker owns it now; finish() would refuse anyway
            if isinstance(result, BaseException):
                if isinstance(result, Cancelled) and self._stop.is_set() and not self.store.cancel_requested(row.id):
                    self.store.requeue(row.id, owner=row.lease_owner)
                    continue
                if not isinstance(result, (errors.NemotronFastError, ValueError)):
                    logger.error("request %s failed:\n%s", row.id,
                                 "".join(traceback.format_exception(type(result), result, result.__traceback__)))
                self._finish(row, outcome_for_exception(result), elapsed)
            else:
                self._log_usage(row.id, result, elapsed)
                self._finish(row, Outcome(200, result), elapsed)

    def _run_one(self, row: RequestRow, inputs: dict[str, Any]) -> dict[str, Any] | BaseException:
        blocks = 0
        steps = self.steps if self.steps is not None and wants_steps(row.input) else None
        extra: dict[str, Any] = {}
        if steps is not None:
            steps.start(row.id)
            # only for requests that asked: an ordinary request calls the pipeline exactly as before
            extra["on_step"] = lambda record: steps.add(row.id, {"type": "step", **record})

        def on_progress(text: str) -> None:
            nonlocal blocks
            blocks += 1
            self.store.set_partial(row.id, text)
            self.store.log(row.id, "INFO", f"Block {blocks} committed ({len(text)} characters so far)")
            if steps is not None:
                steps.add(row.id, {"type": "output", "output": text})

        try:
            return self.pipeline.run(inputs, on_progress=on_progress, should_cancel=self._should_cancel(row.id),
                                     allow_private_urls=self.allow_private_urls, allow_local_files=True,
                                     log=lambda message: self.store.log(row.id, "INFO", str(message)), **extra)
        except Exception as exc:
            return exc
        finally:
            if steps is not None:
                steps.finish(row.id)

    def _log_usage(self, request_id: str, result: dict[str, Any], elapsed: float) -> None:
        usage = result.get("usage") if isinstance(result, dict) else None
        if isinstance(usage, dict):
            self.store.log(request_id, "INFO", f"Generated {usage.get('completion_tokens')} tokens with "
                                               f"{usage.get('num_function_evals')} function evals in {elapsed:.3f} s")

    def _finish(self, row: RequestRow, outcome: Outcome, elapsed: float) -> None:
        if not self.store.finish(row.id, outcome, inference_time=round(elapsed, 6), owner=row.lease_owner):
            logger.warning("request %s: result not written (already completed, or its lease was lost)", row.id)
