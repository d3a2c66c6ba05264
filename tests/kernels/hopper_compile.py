"""Compile every Triton kernel of ``nemotron_fast.kernels`` for Hopper (sm_90) and Ampere (sm_80) without a GPU.

Run as a script (``python tests/kernels/hopper_compile.py``) in a process WITHOUT ``TRITON_INTERPRET``: the
interpreter replaces the kernels and patches ``triton.language``, so compiling cannot share a process with
the interpreted tests. Prints one JSON object: spec name (``name`` for sm_90, ``name@sm_80`` for sm_80) ->
``{"ok", "ptx_bytes", "target", "error"}``.
Each spec is one specialisation the host functions launch (every kernel, every logits dtype, every
constexpr mode at least once).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import traceback

HOPPER = ("cuda", 90, 32)
AMPERE = ("cuda", 80, 32)


def _signature(fn, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    # Scalars default to i32 (what Triton infers for small Python ints), stride_* included.
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            raise KeyError(f"{fn.__name__}: no type given for pointer {name}")
        else:
            sig[name] = "i32"
    return sig


def _specs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    conf = importlib.import_module("nemotron_fast.kernels.confidence")
    head = importlib.import_module("nemotron_fast.kernels.head_confidence")
    attn = importlib.import_module("nemotron_fast.kernels.block_attention")
    parts = {"part_m_ptr": "*fp32", "part_s_ptr": "*fp32", "part_key_ptr": "*fp64", "part_idx_ptr": "*i32",
             "part_logit_ptr": "*fp32"}
    specs = []
    scalars = {"temperature": "fp64", "seed": "i64", "offset_ptr": "*i64"}
    for dt, noise, unit_t in (("fp32", 0, False), ("bf16", 1, True), ("fp16", 2, False), ("bf16", 0, False)):
        specs.append((f"confidence_argmax[{dt},noise={noise}]", conf._confidence_argmax_kernel,
                      {"logits_ptr": f"*{dt}", "u_ptr": "*fp64", **scalars, **parts},
                      {"NOISE": noise, "UNIT_T": unit_t, "BLOCK_V": 4096}, 8))
    for dt in ("fp32", "bf16", "fp16"):
        specs.append((f"confidence_argmax_combine[{dt}]", conf._confidence_argmax_combine_kernel,
                      {"x0_ptr": "*i64", "conf_ptr": f"*{dt}", **parts}, {"BLOCK_S": 256}, 1))
    # The production bf16 tile; smaller row tiles for the fp32 (FMA dot) and fp64-noise variants, whose full
    # tiles take ~7 s each to compile and lower through the same paths.
    for dt, noise, block_n, block_k in (("bf16", 0, 64, 64), ("fp32", 0, 16, 32), ("fp16", 2, 16, 64)):
        specs.append((f"head_confidence_argmax[{dt},noise={noise}]", head._head_confidence_argmax_kernel,
                      {"hidden_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "u_ptr": "*fp64", **scalars, **parts},
                      {"NOISE": noise, "UNIT_T": False, "INPUT_PRECISION": "ieee" if dt == "fp32" else "tf32",
                       "UPCAST_DOT": False, "BLOCK_N": block_n, "BLOCK_V": 128, "BLOCK_K": block_k}, 4))
    # The autotuner's widest bf16 tile, with Philox noise and software pipelining.
    specs.append(("head_confidence_argmax[bf16,noise=2,tuned]", head._head_confidence_argmax_kernel,
                  {"hidden_ptr": "*bf16", "weight_ptr": "*bf16", "u_ptr": "*fp64", **scalars, **parts},
                  {"NOISE": 2, "UNIT_T": False, "INPUT_PRECISION": "tf32", "UPCAST_DOT": False, "BLOCK_N": 32,
                   "BLOCK_V": 256, "BLOCK_K": 64}, {"num_warps": 8, "num_stages": 3}))
    # Block attention: the 8B's bf16 tiles (a 32-token GQA-4 group = 128 query rows, D 128) for the denoise step
    # (split-KV partials) and the commit (direct output); fp16 at D 256; fp32's FMA tile as launched.
    for dt, causal, split, block_m, block_n, block_d, warps in (
            ("bf16", False, True, 128, 64, 128, 8), ("bf16", True, False, 128, 64, 128, 8),
            ("fp16", False, False, 64, 32, 256, 8), ("fp32", True, True, 32, 32, 128, 4)):
        io = {name: f"*{dt}" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "k_new_ptr", "v_new_ptr", "out_ptr")}
        specs.append((f"block_attention[{dt},causal={causal},split={split}]", attn._block_attention_kernel,
                      {**io, "start_ptr": "*i64", "pad_ptr": "*i64", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
                       "part_acc_ptr": "*fp32", "qk_scale": "fp32"},
                      {"CAUSAL": causal, "SPLIT": split, "UPCAST_DOT": False,
                       "INPUT_PRECISION": "ieee" if dt == "fp32" else "tf32", "BLOCK_M": block_m,
                       "BLOCK_N": block_n, "BLOCK_D": block_d}, warps))
    for dt in ("fp32", "bf16", "fp16"):
        specs.append((f"block_attention_combine[{dt}]", attn._block_attention_combine_kernel,
                      {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": f"*{dt}"},
                      {"BLOCK_R": 16, "BLOCK_D": 128}, 4))
    return specs


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"error": "run without TRITON_INTERPRET"}))
        return 2
    from triton.backends.compiler import GPUTarget

    results = {}
    for arch, suffix in ((HOPPER, ""), (AMPERE, "@sm_80")):
        target = GPUTarget(*arch)
        for name, fn, types, constexprs, num_warps in _specs():
            name = name + suffix
            # the last field is num_warps, or a dict of compile options
            options = num_warps if isinstance(num_warps, dict) else {"num_warps": num_warps}
            _compile_one(results, name, fn, types, constexprs, target, options)
    print(json.dumps(results))
    return 0


def _compile_one(results: dict, name: str, fn: object, types: dict, constexprs: dict, target: object,
                 options: dict) -> None:
    """Compile one spec for ``target`` into ``results[name]``."""
    import triton
    from triton.compiler import ASTSource

    try:
        src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=options)
        ptx = compiled.asm["ptx"]
        found = re.search(r"^\.target\s+(\S+)", ptx, re.M)
        ok = f".entry {fn.__name__}" in ptx and bool(compiled.asm.get("cubin"))
        results[name] = {"ok": ok, "ptx_bytes": len(ptx), "target": found.group(1) if found else None,
                         "error": None}
    except Exception:  # reported per spec, so one lowering error does not hide the others
        results[name] = {"ok": False, "ptx_bytes": 0, "target": None, "error": traceback.format_exc(limit=3)}


if __name__ == "__main__":
    sys.exit(main())
