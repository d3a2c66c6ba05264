"""The hosted endpoint's input schema and its parameter rules, as pure validation (no I/O).

Every rule failure becomes an :class:`InputValidationError` entry in FastAPI/pydantic style naming the field
and the numbers, so the CLI prints a sentence and the server answers 422 with a ``detail`` list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputValidationError
from .sampling import MODES

__all__ = ["RequestParams", "validate_inputs", "DEFAULTS", "MAX_TOKENS_LIMIT"]

DEFAULTS: dict[str, Any] = {"max_tokens": 512, "num_inference_steps": 256, "block_length": 32, "threshold": 0.9}
# A completion longer than this would need a KV cache of absurd size; refuse it instead of running out of memory.
MAX_TOKENS_LIMIT = 16384


@dataclass(frozen=True)
class RequestParams:
    """A validated request: the derived ``num_blocks`` and ``steps`` follow the endpoint's rules."""

    image_url: str
    prompt: str
    max_tokens: int
    block_length: int
    threshold: float
    steps: int
    num_blocks: int
    mode: str = "diffusion"

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def batch_key(self) -> tuple[int, int, int, float, str]:
        """Requests with equal keys can share one batched generation."""
        return (self.max_tokens, self.block_length, self.steps, self.threshold, self.mode)


def _err(field: str, msg: str, type_: str, value: Any = None) -> dict[str, Any]:
    e: dict[str, Any] = {"loc": ["body", field], "msg": msg, "type": type_}
    if value is not None:
        e["input"] = value
    return e


def _int_field(inputs: dict[str, Any], field: str, errors: list[dict[str, Any]], minimum: int) -> int | None:
    v = inputs.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            errors.append(_err(field, "Input should be a valid integer", "int_type", v))
            return None
    if v < minimum:
        errors.append(_err(field, f"Input should be greater than or equal to {minimum}", "greater_than_equal", v))
        return None
    return v


def validate_inputs(inputs: Any, *, max_context: int | None = None) -> RequestParams:
    """Apply the schema: required ``image_url``/``prompt``; ``max_tokens`` >= 1 (default 512); ``block_length``
    >= 1 (32); both at most ``MAX_TOKENS_LIMIT`` and, given the model's context length ``max_context``, at most
    that; ``threshold`` in [0, 1] (0.9); ``num_inference_steps`` (alias ``inference_steps``): explicit
    values must be >= and divisible by ``num_blocks = ceil(max_tokens / block_length)``, an omitted one is 256
    rounded up to the next multiple of ``num_blocks``. Unknown fields are ignored, as the hosted endpoint does.

    Beyond the endpoint's schema, an opt-in ``mode`` picks the decoding mode of the same weights:
    ``"diffusion"`` (default: the endpoint's behaviour), ``"ar"`` or ``"linear_spec"`` (see
    :func:`nemotron_fast.generate`); the step rule is applied in every mode (the others ignore the steps).
    """
    if not isinstance(inputs, dict):
        raise InputValidationError([{"loc": ["body"], "msg": "Input should be a valid dictionary",
                                     "type": "dict_type"}])
    errors: list[dict[str, Any]] = []
    strings: dict[str, str] = {}
    for field in ("image_url", "prompt"):
        v = inputs.get(field)
        if v is None:
            errors.append(_err(field, "Field required", "missing"))
        elif not isinstance(v, str):
            errors.append(_err(field, "Input should be a valid string", "string_type", v))
        elif not v.strip():
            errors.append(_err(field, "String should have at least 1 character", "string_too_short", v))
        else:
            strings[field] = v
    max_tokens = _int_field(inputs, "max_tokens", errors, 1)
    block_length = _int_field(inputs, "block_length", errors, 1)
    limit, why = MAX_TOKENS_LIMIT, ""
    if max_context is not None and max_context < limit:
        limit, why = max_context, f" (the model's context length is {max_context} tokens)"
    if max_tokens is not None and max_tokens > limit:
        errors.append(_err("max_tokens", f"Input should be less than or equal to {limit}{why}", "less_than_equal",
                           max_tokens))
        max_tokens = None
    if block_length is not None and block_length > limit:
        errors.append(_err("block_length", f"Input should be less than or equal to {limit}{why}", "less_than_equal",
                           block_length))
        block_length = None
    threshold = inputs.get("threshold", DEFAULTS["threshold"])
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        errors.append(_err("threshold", "Input should be a valid number between 0 and 1", "float_type", threshold))
        threshold = None
    elif not 0.0 <= threshold <= 1.0:
        errors.append(_err("threshold", f"Input should be between 0 and 1, got {threshold}", "value_error", threshold))
        threshold = None
    mode = inputs.get("mode")
    if mode is None:
        mode = "diffusion"
    elif mode not in MODES:
        errors.append(_err("mode", f"Input should be one of {', '.join(repr(m) for m in MODES)}", "literal_error",
                           mode))
    steps_a = _int_field(inputs, "num_inference_steps", errors, 1)
    steps_b = _int_field(inputs, "inference_steps", errors, 1)
    if steps_a is not None and steps_b is not None and steps_a != steps_b:
        errors.append(_err("inference_steps", f"inference_steps ({steps_b}) and num_inference_steps ({steps_a}) "
                           "differ; give one of them", "value_error", steps_b))
    steps = steps_a if steps_a is not None else steps_b
    steps_field = "num_inference_steps" if steps_a is not None else "inference_steps"
    # an absent (or null) field takes its default; an invalid one was reported and stays None
    mt = DEFAULTS["max_tokens"] if inputs.get("max_tokens") is None else max_tokens
    bl = DEFAULTS["block_length"] if inputs.get("block_length") is None else block_length
    num_blocks = math.ceil(mt / bl) if mt is not None and bl is not None else None
    if num_blocks is not None:
        if steps is None:
            steps = math.ceil(DEFAULTS["num_inference_steps"] / num_blocks) * num_blocks
        elif steps < num_blocks or steps % num_blocks:
            errors.append(_err(steps_field, f"{steps_field} ({steps}) must be >= and divisible by the number of "
                               f"blocks ({num_blocks} = ceil(max_tokens {mt} / block_length {bl}))",
                               "value_error", steps))
    if errors:
        raise InputValidationError(errors)
    assert mt is not None and bl is not None and num_blocks is not None and steps is not None
    return RequestParams(strings["image_url"], strings["prompt"], mt, bl, float(threshold), steps, num_blocks, mode)
