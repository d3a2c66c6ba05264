"""OpenAI-compatible ``POST /v1/chat/completions`` (and ``GET /v1/models``), mapped onto the same pipeline.

Mapping: the single ``image_url`` content part of the user messages becomes ``image_url``; the text of the last
user message (after any system/developer text) becomes ``prompt``; ``max_completion_tokens`` or ``max_tokens``
becomes ``max_tokens``; ``block_length``, ``threshold``, ``num_inference_steps`` and ``mode`` (``"diffusion"``,
``"ar"``, ``"linear_spec"``) may be passed as extra body fields. Decoding is greedy, so ``temperature`` is
accepted and ignored. Conversation history (assistant turns) is not fed to the model: the endpoint answers one
question about one image.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import errors
from .schemas import ChatCompletionRequest, ErrorDetail, check_image_url
from .service import Service, sse_event
from .store import RequestRow

__all__ = ["build_openai_router", "chat_to_inputs"]


def _error(status: int, detail: Any) -> JSONResponse:
    message = detail if isinstance(detail, str) else "; ".join(str(d.get("msg")) for d in detail)
    return JSONResponse({"detail": detail, "error": {"message": message, "type": "invalid_request_error",
                                                     "code": status}}, status_code=status)


def chat_to_inputs(body: ChatCompletionRequest) -> dict[str, Any]:
    """Endpoint inputs of a chat request; raises ``InputValidationError`` naming the offending message part."""
    system: list[str] = []
    prompt: list[str] = []
    images: list[tuple[tuple[Any, ...], str]] = []
    for i, message in enumerate(body.messages):
        parts = [message.content] if isinstance(message.content, str) else (message.content or [])
        texts: list[str] = []
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif part.type == "text":
                texts.append(part.text or "")
            elif part.image_url is not None and message.role == "user":
                images.append((("body", "messages", i, "content", j, "image_url", "url"), part.image_url.url))
        if message.role in ("system", "developer"):
            system.extend(texts)
        elif message.role == "user":
            prompt = texts
    problems: list[dict[str, Any]] = []
    if len(images) != 1:
        problems.append({"loc": ["body", "messages"], "type": "value_error",
                         "msg": f"exactly one image_url content part is required in the user messages, got "
                                f"{len(images)}"})
    text = "\n\n".join(t for t in ("\n".join(system).strip(), "\n".join(prompt).strip()) if t)
    if not "\n".join(prompt).strip():
        problems.append({"loc": ["body", "messages"], "type": "value_error",
                         "msg": "the last user message needs a non-empty text part"})
    if len(images) == 1:
        try:
            check_image_url(images[0][1])
        except ValueError as exc:
            problems.append({"loc": list(images[0][0]), "msg": str(exc), "type": "value_error"})
    if problems:
        raise errors.InputValidationError(problems)
    inputs: dict[str, Any] = {"image_url": images[0][1], "prompt": text}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        inputs["max_tokens"] = max_tokens
    for name in ("block_length", "threshold", "num_inference_steps", "mode"):
        value = getattr(body, name)
        if value is not None:
            inputs[name] = value
    return inputs


def _completion(row: RequestRow, model: str, max_tokens: int) -> dict[str, Any]:
    result = json.loads(row.body or "{}")
    usage = result.get("usage") or {}
    completion_tokens = int(usage.get("completion_tokens") or 0)
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return {
        "id": f"chatcmpl-{row.id}", "object": "chat.completion", "created": int(row.created_at), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.get("output", "")},
                     "finish_reason": "length" if completion_tokens >= max_tokens else "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def build_openai_router(svc: Service) -> APIRouter:
    """``/v1/models`` and ``/v1/chat/completions`` for the served model."""
    router = APIRouter(tags=["openai"])
    model_id = svc.config.app_id

    @router.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """The one model this server runs."""
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(svc.started_at),
                                            "owned_by": "nemotron-fast"}]}

    @router.post("/v1/chat/completions", responses={200: {"content": {"text/event-stream": {}}},
                                                     422: {"model": ErrorDetail}, 400: {"model": ErrorDetail}})
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        """Chat completion over one image and one question; ``stream: true`` sends chunks as blocks commit."""
        try:
            inputs = chat_to_inputs(body)
            await to_thread.run_sync(svc.validate, inputs)
        except errors.InputValidationError as exc:
            return _error(422, list(exc.errors))
        model = body.model or model_id
        max_tokens = int(inputs.get("max_tokens", 512))
        kind = "stream" if body.stream else "sync"
        request_id, _ = await to_thread.run_sync(lambda: svc.store.submit(inputs, kind=kind))
        row = await svc.wait_done(request, request_id, until_partial=body.stream)
        if row is None:
            return JSONResponse({"detail": "Client disconnected"}, status_code=499)
        if row.state == "done" and (row.status_code or 500) >= 400:
            detail = json.loads(row.body or "{}").get("detail", "Generation failed")
            return _error(row.status_code or 500, detail)
        if not body.stream:
            return JSONResponse(_completion(row, model, max_tokens), headers={"x-fal-request-id": request_id})
        return StreamingResponse(_chunks(svc, row, model, max_tokens), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "x-fal-request-id": request_id})

    return router


async def _chunks(svc: Service, row: RequestRow, model: str, max_tokens: int) -> AsyncIterator[bytes]:
    base = {"id": f"chatcmpl-{row.id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return sse_event(json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                                     **extra}))

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    finished = False
    try:
        async for item in svc.partials(row.id):
            if isinstance(item, str):
                # Deltas only ever extend what was sent; a trailing partial character waits for the next block.
                text = item.rstrip("\ufffd")
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
                elif not item:
                    yield b": keep-alive\n\n"
                continue
            finished = True
            if (item.status_code or 500) >= 400:
                detail = json.loads(item.body or "{}").get("detail", "Generation failed")
                yield sse_event(json.dumps({"error": {"message": str(detail), "type": "server_error",
                                                      "code": item.status_code}}))
            else:
                done = _completion(item, model, max_tokens)
                output = done["choices"][0]["message"]["content"]
                if output.startswith(sent) and len(output) > len(sent):
                    yield chunk({"content": output[len(sent):]})
                yield chunk({}, done["choices"][0]["finish_reason"], usage=done["usage"])
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            svc.store.cancel(row.id)
