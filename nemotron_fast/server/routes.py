"""The fal queue API, the synchronous run and the output stream, all on one origin (spec sections 1-3, 10).

Paths for app ``owner/alias``: submit ``POST /queue/owner/alias``; status, status stream, result and cancel under
``/queue/owner/alias/requests/{id}`` (also accepted without ``/queue`` and with a trailing slash); sync run
``POST /owner/alias``; output stream ``POST /owner/alias/stream``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .. import errors
from .schemas import CancelResponse, ErrorDetail, NemotronInput, NemotronOutput, QueueStatus, QueueSubmitResponse
from .service import Service, sse_event
from .steps import STEP_LEVEL, STEPS_FIELD, wants_steps
from .store import RequestRow
from .webhooks import check_outbound_url
from .worker import outcome_for_exception

__all__ = ["build_queue_router", "error_detail", "result_response", "validation_error"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ERRORS: dict[int | str, dict[str, Any]] = {422: {"model": ErrorDetail}}
# The queue reads its body itself (an invalid input is queued and fails there), yet publishes the input schema.
_INPUT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/NemotronInput"}}}}}


def validation_error(detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=422)


def error_detail(errors: Any, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as a JSON-safe 422 ``detail``: ``loc`` (after ``prefix``), ``msg``, ``type`` and a plain
    ``ctx``; ``input`` is left out (it may echo a megabyte data URI or a non-JSON object)."""
    detail = []
    for err in errors:
        item: dict[str, Any] = {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        if "ctx" in err:
            item["ctx"] = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                           for k, v in err["ctx"].items()}
        detail.append(item)
    return detail


def not_found(request_id: str) -> JSONResponse:
    # No x-fal-request-id here: an unknown id is caller input, and may not even be a valid header value.
    return JSONResponse({"detail": f"Request {request_id!r} not found"}, status_code=404)


def result_response(row: RequestRow) -> JSONResponse:
    """The stored result with its original status; ``x-fal-request-id`` always, ``X-Fal-Error-Type`` on errors."""
    headers = {"x-fal-request-id": row.id}
    if row.error_type and (row.status_code or 500) >= 400:
        headers["X-Fal-Error-Type"] = row.error_type
    body = json.loads(row.body) if row.body is not None else None
    return JSONResponse(body, status_code=row.status_code or 500, headers=headers)


def build_queue_router(svc: Service) -> APIRouter:
    """Routes of the queue API and the run endpoints for ``svc.config.app_id``."""
    router = APIRouter()
    app_id = svc.config.app_id
    store = svc.store

    def check_inputs(body: NemotronInput) -> dict[str, Any] | JSONResponse:
        inputs = body.to_pipeline()
        try:
            svc.validate(inputs)
        except errors.InputValidationError as exc:
            return validation_error(list(exc.errors))
        return inputs

    def refusal(raw: bytes) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """``(inputs, None)`` for a valid body, else ``(what could be read of it, the 422 detail)``."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            pos = getattr(exc, "pos", 0)
            return {}, [{"loc": ["body", pos], "msg": "JSON decode error", "type": "json_invalid",
                         "ctx": {"error": getattr(exc, "msg", str(exc))}}]
        try:
            inputs = NemotronInput.model_validate(data).to_pipeline()
        except ValidationError as exc:
            return (data if isinstance(data, dict) else {}), error_detail(exc.errors(), ("body",))
        try:
            svc.validate(inputs)
        except errors.InputValidationError as exc:
            return inputs, list(exc.errors)
        return inputs, None

    @router.post(f"/queue/{app_id}", response_model=QueueSubmitResponse, responses=_ERRORS, tags=["queue"],
                 openapi_extra=_INPUT_BODY)
    async def submit(request: Request,
                     fal_webhook: str | None = Query(None, max_length=4096,
                                                     description="URL that receives the result as a signed POST."),
                     x_fal_queue_priority: Literal["normal", "low"] | None = Header(None),
                     x_fal_request_timeout: float | None = Header(None, gt=0, allow_inf_nan=False,
                                                                  description="Seconds the request may wait to start.")
                     ) -> JSONResponse:
        """Queue a request; poll ``status_url``, fetch ``response_url``, or ``PUT cancel_url``.

        As on the hosted queue, an invalid input is accepted too: it gets a request id and is COMPLETED at once
        with the error (its result is the 422 with the ``detail`` list, its webhook ``status: "ERROR"``). Only a
        bad ``fal_webhook`` or queue header is answered 422 here."""
        if fal_webhook is not None:
            why = check_outbound_url(fal_webhook, allow_private=svc.config.allow_private_urls, resolve=False)
            if why is not None:
                return validation_error([{"loc": ["query", "fal_webhook"], "msg": f"fal_webhook {why}",
                                          "type": "value_error", "input": fal_webhook}])
        inputs, detail = await to_thread.run_sync(refusal, await request.body())
        outcome = outcome_for_exception(errors.InputValidationError(detail)) if detail else None
        request_id, position = await to_thread.run_sync(lambda: store.submit(
            inputs, webhook_url=fal_webhook, priority=1 if x_fal_queue_priority == "low" else 0,
            start_timeout=x_fal_request_timeout, outcome=outcome))
        body_out = {"status": "IN_QUEUE", "request_id": request_id, "gateway_request_id": request_id,
                    **svc.request_urls(request, request_id), "queue_position": position}
        return JSONResponse(body_out, headers={"x-fal-request-id": request_id})

    def status(request: Request, request_id: str,
               logs: bool = Query(False, description="Include the cumulative logs (1/0/true/false).")
               ) -> JSONResponse:
        """202 while IN_QUEUE / IN_PROGRESS, 200 once COMPLETED (failures included, with ``error``)."""
        row = store.get(request_id)
        if row is None:
            return not_found(request_id)
        return JSONResponse(svc.status_body(request, row, with_logs=logs), status_code=200 if row.state == "done"
                            else 202, headers={"x-fal-request-id": request_id})

    async def status_stream(request: Request, request_id: str, logs: bool = Query(False)) -> Any:
        """Server-sent status events (only new log lines per event); closed after the COMPLETED event."""
        row = await to_thread.run_sync(store.get, request_id)
        if row is None:
            return not_found(request_id)
        return StreamingResponse(_status_events(svc, request, request_id, logs), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, "x-fal-request-id": request_id})

    def result(request_id: str) -> JSONResponse:
        """The model output (200), or the failed request's original status and body."""
        row = store.get(request_id)
        if row is None:
            return not_found(request_id)
        if row.state != "done":
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400,
                                headers={"x-fal-request-id": request_id})
        return result_response(row)

    def cancel(request_id: str) -> JSONResponse:
        """202 CANCELLATION_REQUESTED; 400 ALREADY_COMPLETED; 404 NOT_FOUND."""
        outcome = store.cancel(request_id)
        if outcome == "not_found":
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        code, status_text = (400, "ALREADY_COMPLETED") if outcome == "already_completed" else (
            202, "CANCELLATION_REQUESTED")
        return JSONResponse({"status": status_text}, status_code=code, headers={"x-fal-request-id": request_id})

    async def steps_stream(request_id: str) -> Any:
        """Server-sent step events of a request submitted with ``"stream_steps": true`` (see ``server.steps``)."""
        row = await to_thread.run_sync(store.get, request_id)
        if row is None:
            return not_found(request_id)
        if not wants_steps(row.input):
            return JSONResponse({"detail": f"This request records no step events: submit it with "
                                           f"\"{STEPS_FIELD}\": true in its input"}, status_code=400,
                                headers={"x-fal-request-id": request_id})
        return StreamingResponse(_step_events(svc, request_id), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, "x-fal-request-id": request_id})

    owner_alias = app_id
    routes: list[tuple[str, Any, str, dict[str, Any]]] = [
        ("/status", status, "GET", {"response_model": QueueStatus, "status_code": 202,
                                    "responses": {200: {"model": QueueStatus}, 404: {"model": ErrorDetail}}}),
        ("/status/stream", status_stream, "GET", {"response_class": StreamingResponse, "responses": {
            200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorDetail}}}),
        ("", result, "GET", {"response_model": NemotronOutput, "responses": {
            400: {"model": ErrorDetail}, 404: {"model": ErrorDetail}, 422: {"model": ErrorDetail},
            500: {"model": ErrorDetail}}}),
        ("/cancel", cancel, "PUT", {"response_model": CancelResponse, "status_code": 202, "responses": {
            400: {"model": CancelResponse}, 404: {"model": CancelResponse}}}),
    ]
    for prefix in ("/queue", ""):
        for suffix, endpoint, method, extra in routes:
            for slash in ("", "/"):
                path = f"{prefix}/{owner_alias}/requests/{{request_id}}{suffix}{slash}"
                router.add_api_route(path, endpoint, methods=[method], tags=["queue"],
                                     include_in_schema=prefix == "/queue" and not slash, **extra)
    # beyond the hosted API (kept out of its schema, like the opt-in field): the playground's step stream
    router.add_api_route(f"/queue/{owner_alias}/requests/{{request_id}}/steps", steps_stream, methods=["GET"],
                         include_in_schema=False)

    @router.post(f"/{app_id}", response_model=NemotronOutput, tags=["run"], responses={
        **_ERRORS, 400: {"model": ErrorDetail}, 500: {"model": ErrorDetail}})
    async def run_sync(request: Request, body: NemotronInput) -> JSONResponse:
        """Run and wait: the body is the result (``x-fal-request-id`` header); errors keep their status."""
        inputs = await to_thread.run_sync(check_inputs, body)
        if isinstance(inputs, JSONResponse):
            return inputs
        request_id, _ = await to_thread.run_sync(lambda: store.submit(inputs, kind="sync"))
        row = await svc.wait_done(request, request_id)
        if row is None:
            return JSONResponse({"detail": "Client disconnected"}, status_code=499)
        return result_response(row)

    @router.post(f"/{app_id}/stream", tags=["run"], response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {}}}, **_ERRORS})
    async def run_stream(request: Request, body: NemotronInput) -> Any:
        """SSE of ``{"output": text so far, "partial": true}`` per committed block, then the final result with
        ``"partial": false``. Errors before the first block are plain JSON responses with their status."""
        inputs = await to_thread.run_sync(check_inputs, body)
        if isinstance(inputs, JSONResponse):
            return inputs
        request_id, _ = await to_thread.run_sync(lambda: store.submit(inputs, kind="stream"))
        row = await svc.wait_done(request, request_id, until_partial=True)
        if row is None:
            return JSONResponse({"detail": "Client disconnected"}, status_code=499)
        if row.state == "done" and (row.status_code or 500) >= 400:
            return result_response(row)
        return StreamingResponse(_output_events(svc, request_id), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, "x-fal-request-id": request_id})

    return router


async def _status_events(svc: Service, request: Request, request_id: str, with_logs: bool) -> AsyncIterator[bytes]:
    store = svc.store
    seen_version, last_log, last_key = -1, 0, None
    last_beat = time.monotonic()
    while True:
        version = store.version(request_id)
        if version != seen_version:
            seen_version = version
            # the logs before the row: every transition a log line marks has then happened before the row was
            # read (the row's state is never behind its logs); a finished row's last lines are read after it
            new_logs = await to_thread.run_sync(store.logs, request_id, last_log)
            row = await to_thread.run_sync(store.get, request_id)
            if row is None:
                return
            if row.state == "done":
                new_logs += await to_thread.run_sync(store.logs, request_id, new_logs[-1][0] if new_logs else last_log)
            if new_logs:
                last_log = new_logs[-1][0]
                new_logs = [e for e in new_logs if e[2] != STEP_LEVEL]  # the playground's step events
            # statuses it passed through between two looks (a fast run, a requeue and a re-claim): the store logs
            # every transition, so each one is reported, with the lines logged while it held
            *passed, (_, new_logs) = _status_segments(new_logs, last_key[0] if last_key else None, row.wire_status)
            for status, seg_logs in passed:
                ghost = dataclasses.replace(row, state=_STATE_OF[status])
                ghost_body = await to_thread.run_sync(
                    lambda ghost=ghost, seg_logs=seg_logs: svc.status_body(request, ghost, with_logs=with_logs,
                                                                         logs=seg_logs))
                last_key = (status, ghost_body.get("queue_position"))
                yield sse_event(json.dumps(ghost_body))
            if not with_logs:
                new_logs = []
            body = await to_thread.run_sync(
                lambda row=row, new_logs=new_logs: svc.status_body(request, row, with_logs=with_logs, logs=new_logs))
            key = (body["status"], body.get("queue_position"))
            if new_logs or key != last_key:
                last_key = key
                last_beat = time.monotonic()
                yield sse_event(json.dumps(body))
            if row.state == "done":
                return
        if time.monotonic() - last_beat >= svc.config.keepalive_interval:
            last_beat = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(0.1)


_STATE_OF = {"IN_QUEUE": "queued", "IN_PROGRESS": "running", "COMPLETED": "done"}


def _logged_status(entry: tuple[int, float, str, str], following: tuple[int, float, str, str] | None) -> str | None:
    """The status a store log line marks the start of (``Started`` claims, ``... queued again`` requeues unless
    re-claimed in the same transaction, ``Completed``/``Failed`` finishes), or None."""
    message = entry[3]
    if message.startswith("Started"):
        return "IN_PROGRESS"
    if message.endswith("the request is queued again"):
        reclaimed = following is not None and following[1] == entry[1] and following[3].startswith("Started")
        return None if reclaimed else "IN_QUEUE"
    if message == "Completed" or message.startswith("Failed"):
        return "COMPLETED"
    return None


def _status_segments(logs: list[tuple[int, float, str, str]], last: str | None, current: str
                     ) -> list[tuple[str, list[tuple[int, float, str, str]]]]:
    """Split new log lines at the transitions they mark -> [(status, its lines), ...]; the last segment is the
    current status's. Segments that repeat ``last`` (the status already reported) only carry lines, and a
    first look (``last`` None) reports just the current status."""
    if last is None:
        return [(current, list(logs))]
    segments: list[tuple[str, list]] = [(last, [])]
    for i, entry in enumerate(logs):
        status = _logged_status(entry, logs[i + 1] if i + 1 < len(logs) else None)
        if status is not None and status != segments[-1][0]:
            segments.append((status, [entry]))
        else:
            segments[-1][1].append(entry)
    if segments[-1][0] != current:  # a transition without its line (e.g. a shutdown requeue): the row decides
        segments.append((current, []))
    if len(segments) > 1 and not segments[0][1]:
        segments.pop(0)
    *passed, (_, tail) = segments
    return [*passed, (current, tail)]


async def _step_events(svc: Service, request_id: str) -> AsyncIterator[bytes]:
    """``status`` events while queued (with the queue position), the recorded step/output events while running,
    then one ``done`` event (the result itself is at the response URL)."""
    store, sent, last_status, seen, row = svc.store, 0, None, -1, None
    last_beat = time.monotonic()
    while True:
        version = store.version(request_id)
        if version != seen or row is None:
            seen = version
            row = await to_thread.run_sync(store.get, request_id)
            if row is None:
                return
        # the position moves when other requests start, so it is read again every tick while queued
        position = await to_thread.run_sync(store.queue_position, request_id) if row.state == "queued" else None
        status = (row.wire_status, position)
        out: list[dict[str, Any]] = []
        if status != last_status:
            last_status = status
            out.append({"type": "status", "status": row.wire_status, "queue_position": position})
        # the worker records a run's last event before it stores the result, so a done row has all of them
        events = svc.steps.read(request_id, sent)
        sent += len(events)
        out += events
        if row.state == "done":
            out.append({"type": "done", "status": row.wire_status, "status_code": row.status_code,
                        "error": row.error, "error_type": row.error_type})
        if out:
            last_beat = time.monotonic()
            yield b"".join(sse_event(json.dumps(item)) for item in out)
        if row.state == "done":
            return
        if time.monotonic() - last_beat >= svc.config.keepalive_interval:
            last_beat = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(0.05)


async def _output_events(svc: Service, request_id: str) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for item in svc.partials(request_id):
            if isinstance(item, str):
                yield sse_event(json.dumps({"output": item, "partial": True})) if item else b": keep-alive\n\n"
                continue
            finished = True
            body = json.loads(item.body) if item.body else {}
            if (item.status_code or 500) < 400 and isinstance(body, dict):
                yield sse_event(json.dumps({**body, "partial": False}))
            else:
                yield sse_event(json.dumps({"error": {"status_code": item.status_code, "detail": body.get("detail")
                                                      if isinstance(body, dict) else body}, "partial": False}))
    finally:
        if not finished:
            # The client went away mid-stream: nobody will read the rest, stop generating. (Synchronous: an
            # await inside a cancelled scope would be cancelled again.)
            svc.store.cancel(request_id)

