"""The status stream reports every status a request passed through between two looks, from the store's log."""

from __future__ import annotations

from nemotron_fast.server.routes import _status_segments

STARTED, BLOCK, DONE = "Started (batch of 1)", "Block 1 committed (4 tokens so far)", "Completed"
REQUEUED = "Worker w stopped renewing its lease; the request is queued again"


def lines(*items: tuple[float, str]) -> list[tuple[int, float, str, str]]:
    return [(i, ts, "INFO", m) for i, (ts, m) in enumerate(items)]


def test_a_run_between_two_looks_reports_in_progress_with_its_lines() -> None:
    got = _status_segments(lines((1, STARTED), (2, BLOCK), (3, DONE)), "IN_QUEUE", "COMPLETED")
    assert [(s, [e[3] for e in seg]) for s, seg in got] == [("IN_PROGRESS", [STARTED, BLOCK]), ("COMPLETED", [DONE])]


def test_a_requeue_and_a_new_claim_are_both_reported() -> None:
    got = _status_segments(lines((1, BLOCK), (2, REQUEUED), (3, STARTED)), "IN_PROGRESS", "IN_PROGRESS")
    assert [s for s, _ in got] == ["IN_PROGRESS", "IN_QUEUE", "IN_PROGRESS"]


def test_a_reclaim_in_the_same_transaction_was_never_queued() -> None:
    got = _status_segments(lines((2, REQUEUED), (2, STARTED)), "IN_PROGRESS", "IN_PROGRESS")
    assert [s for s, _ in got] == ["IN_PROGRESS"] and len(got[0][1]) == 2


def test_first_look_and_unlogged_transitions_follow_the_row() -> None:
    assert _status_segments(lines((1, STARTED)), None, "IN_PROGRESS") == [("IN_PROGRESS", lines((1, STARTED)))]
    assert _status_segments([], "IN_PROGRESS", "IN_QUEUE") == [("IN_QUEUE", [])]  # a shutdown requeue logs nothing
