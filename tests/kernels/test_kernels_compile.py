"""Every Triton kernel lowers to PTX and a cubin for Hopper (sm_90) and Ampere (sm_80) on a machine without a GPU.

The compilation runs once, in a subprocess without ``TRITON_INTERPRET`` (see ``hopper_compile.py``); each
kernel specialisation is then its own test case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("hopper_compile.py")
SPECS = [
    "confidence_argmax[fp32,noise=0]", "confidence_argmax[bf16,noise=1]", "confidence_argmax[fp16,noise=2]",
    "confidence_argmax[bf16,noise=0]", "confidence_argmax_combine[fp32]", "confidence_argmax_combine[bf16]",
    "confidence_argmax_combine[fp16]", "head_confidence_argmax[bf16,noise=0]",
    "head_confidence_argmax[fp32,noise=0]", "head_confidence_argmax[fp16,noise=2]",
    "head_confidence_argmax[bf16,noise=2,tuned]",
    "block_attention[bf16,causal=False,split=True]", "block_attention[bf16,causal=True,split=False]",
    "block_attention[fp16,causal=False,split=False]", "block_attention[fp32,causal=True,split=True]",
    "block_attention_combine[fp32]", "block_attention_combine[bf16]", "block_attention_combine[fp16]",
]


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"hopper_compile.py failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_spec_was_attempted(compiled):
    assert sorted(compiled) == sorted(SPECS + [f"{s}@sm_80" for s in SPECS])


@pytest.mark.parametrize("spec", SPECS)
def test_kernel_compiles_for_sm90(compiled, spec):
    result = compiled[spec]
    assert result["error"] is None, result["error"]
    assert result["ok"] and result["ptx_bytes"] > 0
    assert result["target"] in ("sm_90", "sm_90a"), result["target"]


@pytest.mark.parametrize("spec", SPECS)
def test_kernel_compiles_for_sm80(compiled, spec):
    result = compiled[f"{spec}@sm_80"]
    assert result["error"] is None, result["error"]
    assert result["ok"] and result["ptx_bytes"] > 0
    assert result["target"] == "sm_80", result["target"]
