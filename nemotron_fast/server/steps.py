"""The opt-in per-step event stream of the playground: what each denoise step revealed, live.

A request submitted with ``"stream_steps": true`` in its input (a field beyond the hosted schema, hidden from it
like ``mode``) runs alone, and the worker records, in memory, one event per denoise step and per commit
(``{"type": "step", ...}``, see ``Pipeline.step_record``) and the answer so far after each block
(``{"type": "output", "output": text}``). ``GET /queue/{app}/requests/{id}/steps`` streams them as server-sent
events, with the queue status before the run (``{"type": "status", ...}``) and a last ``{"type": "done", ...}``.
Requests without the field record nothing: the sampler is called exactly as before. The events are written to
the request store as log lines of level ``STEP`` (kept out of the status logs), so the API process a browser
reached streams what any worker recorded, on SQLite and PostgreSQL alike, and they expire with the request.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["StepLog", "wants_steps", "STEPS_FIELD", "STEP_LEVEL"]

#: The input field that opts a request in.
STEPS_FIELD = "stream_steps"
#: The log level the events are stored under.
STEP_LEVEL = "STEP"


def wants_steps(inputs: dict[str, Any]) -> bool:
    """Whether a request's input opts in to the step stream (``"stream_steps": true``)."""
    return inputs.get(STEPS_FIELD) is True


class StepLog:
    """A request's step events in the request store (``Store.log`` at level :data:`STEP_LEVEL`): the worker
    appends, stream readers read from an index."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def start(self, request_id: str) -> None:
        """A run of the request begins (a rerun after a restart says so, then records afresh)."""
        if self.read(request_id):
            self.add(request_id, {"type": "restart"})

    def add(self, request_id: str, event: dict[str, Any]) -> None:
        self.store.log(request_id, STEP_LEVEL, json.dumps(event))

    def finish(self, request_id: str) -> None:
        """The run ended (nothing to do: the events expire with the request)."""

    def read(self, request_id: str, start: int = 0) -> list[dict[str, Any]]:
        """The request's events from index ``start`` on (none recorded: an empty list)."""
        events = [json.loads(m) for _, _, level, m in self.store.logs(request_id) if level == STEP_LEVEL]
        return events[start:]
