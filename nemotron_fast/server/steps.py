"""The opt-in per-step event stream of the playground: what each denoise step revealed, live.

A request submitted with ``"stream_steps": true`` in its input (a field beyond the hosted schema, hidden from it
like ``mode``) runs alone, and the worker records, in memory, one event per denoise step and per commit
(``{"type": "step", ...}``, see ``Pipeline.step_record``) and the answer so far after each block
(``{"type": "output", "output": text}``). ``GET /queue/{app}/requests/{id}/steps`` streams them as server-sent
events, with the queue status before the run (``{"type": "status", ...}``) and a last ``{"type": "done", ...}``.
Requests without the field record nothing: the sampler is called exactly as before. The events live in memory
(like partial outputs, they serve live connections); the last ``keep`` finished requests' events are kept so a
late reader (or a replay) still gets all of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["StepLog", "wants_steps", "STEPS_FIELD"]

#: The input field that opts a request in.
STEPS_FIELD = "stream_steps"


def wants_steps(inputs: dict[str, Any]) -> bool:
    """Whether a request's input opts in to the step stream (``"stream_steps": true``)."""
    return inputs.get(STEPS_FIELD) is True


class StepLog:
    """Thread-safe, in-memory event lists per request: the worker appends, stream readers read from an index."""

    def __init__(self, keep: int = 64, max_events: int = 200_000) -> None:
        self.keep = keep
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()

    def start(self, request_id: str) -> None:
        """A run of the request begins (a rerun after a restart starts its list afresh)."""
        with self._lock:
            self._events[request_id] = []
            self._finished.pop(request_id, None)

    def add(self, request_id: str, event: dict[str, Any]) -> None:
        """Append one event (dropped past ``max_events`` per request, so a runaway run cannot grow memory)."""
        with self._lock:
            events = self._events.get(request_id)
            if events is not None and len(events) < self.max_events:
                events.append(event)

    def finish(self, request_id: str) -> None:
        """The run ended; the oldest finished requests' events beyond ``keep`` are dropped."""
        with self._lock:
            if request_id not in self._events:
                return
            self._finished[request_id] = None
            self._finished.move_to_end(request_id)
            while len(self._finished) > self.keep:
                old, _ = self._finished.popitem(last=False)
                self._events.pop(old, None)

    def read(self, request_id: str, start: int = 0) -> list[dict[str, Any]]:
        """The request's events from index ``start`` on (none recorded: an empty list)."""
        with self._lock:
            return list(self._events.get(request_id, ())[start:])
