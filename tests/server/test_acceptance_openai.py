"""Acceptance: the OpenAI python client against ``/v1/chat/completions`` (real pipeline), and its error mapping."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest

from .test_acceptance_fal_client import png

pytestmark = pytest.mark.slow


def _messages(uri: str, text: str = "What is shown?") -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]


def test_openai_client_gets_an_answer(real_server: Any, real_pipeline: Any) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png(3)).decode()
    expected = real_pipeline.run({"image_url": uri, "prompt": "Answer briefly.\n\nWhat is shown?", "max_tokens": 12,
                                  "block_length": 4})
    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="anything")
    assert [m.id for m in client.models.list()] == ["fal-ai/nemotron-diffusion-vlm"]
    reply = client.chat.completions.create(model="nemotron", messages=_messages(uri), max_tokens=12,
                                           extra_body={"block_length": 4})
    assert reply.choices[0].message.content == expected["output"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens >= 12 else "stop")
    chunks = list(client.chat.completions.create(model="nemotron", messages=_messages(uri), max_tokens=12,
                                                 stream=True, extra_body={"block_length": 4}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["output"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_errors_are_4xx(real_server: Any) -> None:
    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="anything", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as info:  # no image
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "image_url" in str(info.value)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=_messages("file:///etc/passwd"))
    r = httpx.post(f"{real_server.url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
