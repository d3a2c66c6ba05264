"""Pydantic models of everything the server reads or writes, so the OpenAPI schema is the real contract.

The endpoint's input/output follow ``spec/sampler.md`` (API contract); the queue bodies follow
``spec/fal-api.md`` section 2; the OpenAI-compatible bodies follow the chat-completions API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from ..params import MAX_TOKENS_LIMIT

__all__ = [
    "NemotronInput",
    "NemotronOutput",
    "Usage",
    "Timings",
    "LogEntry",
    "QueueSubmitResponse",
    "QueueStatus",
    "CancelResponse",
    "ErrorDetail",
    "UploadInitiateRequest",
    "UploadInitiateResponse",
    "CdnTokenResponse",
    "CdnUploadResponse",
    "ChatCompletionRequest",
    "ALLOWED_IMAGE_SCHEMES",
    "check_image_url",
]

ALLOWED_IMAGE_SCHEMES = ("http://", "https://", "data:")

# A 28x28 grey PNG: a valid image that keeps OpenAPI examples (and schemathesis' explicit phase) offline.
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAIAAAD9b0jDAAAAKElEQVR42mNsaGhgoDZgYqABGDV01NBRQ0cNHTV01"
    "NBRQ0cNHXyGAgD9bgG49E5a1gAAAABJRU5ErkJggg=="
)


def check_image_url(value: str) -> str:
    """Accept an http(s) URL or a ``data:`` URI; a local path or any other scheme is refused by the server."""
    if not value.strip():
        raise ValueError("image_url must not be empty")
    if not value.lower().startswith(ALLOWED_IMAGE_SCHEMES):
        raise ValueError("image_url must be an http(s) URL or a data: URI (local paths are not accepted by the server)")
    return value


class NemotronInput(BaseModel):
    """Input of ``fal-ai/nemotron-diffusion-vlm`` (unknown fields are ignored, as the hosted endpoint does)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"image_url": EXAMPLE_IMAGE, "prompt": "Describe this image.", "max_tokens": 16, "block_length": 8}
    ]})

    image_url: str = Field(description="http(s) URL or data:<mime>;base64,... URI of the image.")
    prompt: str = Field(min_length=1, description="The question or instruction about the image.")
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS_LIMIT, description="Maximum number of generated tokens.")
    num_inference_steps: int | None = Field(
        None, ge=1,
        description="Denoising steps in total; a multiple of the number of blocks. Omitted: 256 rounded up "
                    "to the next multiple of ceil(max_tokens / block_length).",
    )
    inference_steps: SkipJsonSchema[int | None] = Field(None, ge=1)
    block_length: int = Field(32, ge=1, description="Tokens per diffusion block.")
    threshold: float = Field(0.9, ge=0.0, le=1.0, allow_inf_nan=False,
                             description="Confidence threshold for parallel reveals.")
    # opt-in, beyond the hosted endpoint's schema (hidden from it): the decoding mode of the same weights
    mode: SkipJsonSchema[Literal["diffusion", "ar", "linear_spec"] | None] = None
    # opt-in, hidden likewise: record per-step events for GET .../requests/{id}/steps (the playground's live view)
    stream_steps: SkipJsonSchema[bool | None] = None

    @field_validator("image_url")
    @classmethod
    def _image_scheme(cls, value: str) -> str:
        return check_image_url(value)

    def to_pipeline(self) -> dict[str, Any]:
        """The fields the caller set (omitted stays omitted: the step rule depends on it)."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    num_function_evals: int


class Timings(BaseModel):
    total_time: float
    image_validation_time: float
    preprocessing_time: float
    gpu_transfer_time: float
    generation_time: float
    decode_time: float


class NemotronOutput(BaseModel):
    """Output of the endpoint: the answer, token counts and a timing breakdown in seconds."""

    output: str
    usage: Usage
    timings: Timings


class ErrorDetail(BaseModel):
    """A ``{"detail": ...}`` error body (a message, or a FastAPI-style list of field errors)."""

    detail: str | list[dict[str, Any]]
    error_type: str | None = None


class LogEntry(BaseModel):
    message: str
    level: Literal["STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"]
    source: Literal["USER"] = "USER"
    timestamp: str


class QueueSubmitResponse(BaseModel):
    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    request_id: str
    gateway_request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int


class QueueStatus(BaseModel):
    """Queue status; ``logs`` is null unless asked for with ``?logs=1``. Failures are COMPLETED + ``error``."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    logs: list[LogEntry] | None = None
    queue_position: int | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None
    error_type: str | None = None


class CancelResponse(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class UploadInitiateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content_type: str = Field("application/octet-stream", max_length=255)
    file_name: str | None = Field(None, max_length=1024)


class UploadInitiateResponse(BaseModel):
    upload_url: str
    file_url: str


class CdnTokenResponse(BaseModel):
    token: str
    token_type: str
    base_url: str
    expires_at: str


class CdnUploadResponse(BaseModel):
    access_url: str


class ImageURLPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str
    detail: str | None = None


class ChatContentPart(BaseModel):
    """One content part: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url"}}``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURLPart | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat-completions request; the endpoint's own knobs may ride along (``extra_body``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Accepted and ignored (greedy decoding).")
    block_length: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    num_inference_steps: int | None = Field(None, ge=1)
    # opt-in decoding mode of the same weights (default diffusion, the endpoint's); accepted in the body but kept
    # out of the published schema, like the fal input's
    mode: SkipJsonSchema[Literal["diffusion", "ar", "linear_spec"] | None] = None
