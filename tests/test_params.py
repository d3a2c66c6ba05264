"""The endpoint's parameter rules (sampler.md, API contract)."""

from __future__ import annotations

import pytest

from nemotron_fast.errors import InputValidationError
from nemotron_fast.params import MAX_TOKENS_LIMIT, validate_inputs

BASE = {"image_url": "data:image/png;base64,AAAA", "prompt": "Describe the image."}


def _errors(inputs: dict) -> list[dict]:
    with pytest.raises(InputValidationError) as ei:
        validate_inputs(inputs)
    return ei.value.errors


def test_defaults() -> None:
    p = validate_inputs(BASE)
    assert (p.max_tokens, p.block_length, p.threshold, p.steps, p.num_blocks) == (512, 32, 0.9, 256, 16)
    assert p.steps_per_block == 16


@pytest.mark.parametrize("max_tokens,block,steps", [(100, 32, 256), (10, 3, 256), (1, 1, 256), (300, 7, 258),
                                                    (512, 32, 256), (1000, 1, 1000), (33, 32, 256)])
def test_omitted_steps_round_up(max_tokens: int, block: int, steps: int) -> None:
    p = validate_inputs({**BASE, "max_tokens": max_tokens, "block_length": block})
    nb = -(-max_tokens // block)
    assert p.num_blocks == nb
    assert p.steps % nb == 0 and p.steps >= 256 and p.steps - 256 < nb
    assert p.steps == steps


def test_explicit_steps_must_divide() -> None:
    errs = _errors({**BASE, "max_tokens": 100, "block_length": 32, "num_inference_steps": 6})
    assert errs[0]["loc"] == ["body", "num_inference_steps"]
    assert "6" in errs[0]["msg"] and "4" in errs[0]["msg"]
    errs = _errors({**BASE, "max_tokens": 100, "block_length": 32, "num_inference_steps": 2})
    assert "(2)" in errs[0]["msg"] and "(4" in errs[0]["msg"]
    assert validate_inputs({**BASE, "max_tokens": 100, "block_length": 32, "num_inference_steps": 8}).steps == 8


def test_alias_and_conflict() -> None:
    assert validate_inputs({**BASE, "inference_steps": 32}).steps == 32
    assert validate_inputs({**BASE, "inference_steps": 32, "num_inference_steps": 32}).steps == 32
    errs = _errors({**BASE, "inference_steps": 32, "num_inference_steps": 64})
    assert errs[0]["loc"] == ["body", "inference_steps"] and "32" in errs[0]["msg"] and "64" in errs[0]["msg"]
    errs = _errors({**BASE, "inference_steps": 7})
    assert errs[0]["loc"] == ["body", "inference_steps"]


@pytest.mark.parametrize("field,value,type_", [
    ("max_tokens", 0, "greater_than_equal"), ("max_tokens", -5, "greater_than_equal"),
    ("max_tokens", "12", "int_type"), ("max_tokens", True, "int_type"), ("max_tokens", 1.5, "int_type"),
    ("max_tokens", MAX_TOKENS_LIMIT + 1, "less_than_equal"),
    ("block_length", 0, "greater_than_equal"), ("block_length", [], "int_type"),
    ("threshold", -0.01, "value_error"), ("threshold", 1.01, "value_error"), ("threshold", "0.5", "float_type"),
    ("threshold", float("nan"), "float_type"), ("threshold", True, "float_type"),
    ("num_inference_steps", 0, "greater_than_equal"), ("prompt", "", "string_too_short"),
    ("prompt", "   ", "string_too_short"), ("prompt", 5, "string_type"), ("image_url", None, "missing"),
])
def test_bad_fields_name_the_field(field: str, value, type_: str) -> None:
    errs = _errors({**BASE, field: value})
    assert [e["loc"] for e in errs] == [["body", field]]
    assert errs[0]["type"] == type_


def test_missing_required_and_several_errors_at_once() -> None:
    errs = _errors({"max_tokens": 0})
    assert {tuple(e["loc"]) for e in errs} == {("body", "image_url"), ("body", "prompt"), ("body", "max_tokens")}
    assert all(e["type"] == "missing" for e in errs if e["loc"][1] != "max_tokens")
    assert _errors([1, 2])[0]["type"] == "dict_type"


def test_threshold_edges_and_float_ints() -> None:
    assert validate_inputs({**BASE, "threshold": 0}).threshold == 0.0
    assert validate_inputs({**BASE, "threshold": 1}).threshold == 1.0
    assert validate_inputs({**BASE, "max_tokens": 64.0}).max_tokens == 64
    assert validate_inputs({**BASE, "unknown_field": 1}).max_tokens == 512
