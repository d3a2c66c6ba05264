"""Compile every Triton kernel of ``nemotron_fast.kernels`` for Hopper (sm_90) without a GPU.

Run as a script (``python tests/kernels/hopper_compile.py``) in a process WITHOUT ``TRITON_INTERPRET``: the
interpreter replaces the kernels and patches ``triton.language``, so compiling cannot share a process with
the interpreted tests. Prints one JSON object: spec name -> ``{"ok", "ptx_bytes", "target", "error"}``.
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
    sel = importlib.import_module("nemotron_fast.kernels.unmask")
    kvw = importlib.import_module("nemotron_fast.kernels.kv_write")
    parts = {"part_m_ptr": "*fp32", "part_s_ptr": "*fp32", "part_key_ptr": "*fp64", "part_idx_ptr": "*i32",
             "part_logit_ptr": "*fp32"}
    specs = []
    scalars = {"temperature": "fp64", "seed": "i64", "offset": "i64"}
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
    for dt, mode, has_active in (("bf16", 0, True), ("fp32", 1, True), ("fp16", 2, False)):
        specs.append((f"select_unmask[{dt},mode={mode}]", sel._select_unmask_kernel,
                      {"x0_ptr": "*i64", "conf_ptr": f"*{dt}", "block_ptr": "*i64", "is_mask_ptr": "*i1",
                       "k_ptr": "*i64", "active_ptr": "*i1", "revealed_ptr": "*i1", "threshold": "fp32"},
                      {"MODE": mode, "HAS_ACTIVE": has_active, "BLOCK_L": 32, "BLOCK_J": 32}, 1))
    specs.append(("select_unmask[bf16,mode=1,L=1024]", sel._select_unmask_kernel,
                  {"x0_ptr": "*i64", "conf_ptr": "*bf16", "block_ptr": "*i64", "is_mask_ptr": "*i1",
                   "k_ptr": "*i64", "active_ptr": "*i1", "revealed_ptr": "*i1", "threshold": "fp32"},
                  {"MODE": 1, "HAS_ACTIVE": False, "BLOCK_L": 1024, "BLOCK_J": 4}, 4))
    for dt, per_row in (("bf16", True), ("fp16", False), ("fp32", True)):
        specs.append((f"kv_write[{dt},per_row={per_row}]", kvw._kv_write_kernel,
                      {"cache_ptr": f"*{dt}", "new_ptr": f"*{dt}", "start_ptr": "*i64"},
                      {"PER_ROW_START": per_row, "BLOCK_L": 32, "BLOCK_D": 128}, 4))
    return specs


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(json.dumps({"error": "run without TRITON_INTERPRET"}))
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget(*HOPPER)
    results = {}
    for name, fn, types, constexprs, num_warps in _specs():
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
            ptx = compiled.asm["ptx"]
            found = re.search(r"^\.target\s+(\S+)", ptx, re.M)
            ok = f".entry {fn.__name__}" in ptx and bool(compiled.asm.get("cubin"))
            results[name] = {"ok": ok, "ptx_bytes": len(ptx), "target": found.group(1) if found else None,
                             "error": None}
        except Exception:  # reported per spec, so one lowering error does not hide the others
            results[name] = {"ok": False, "ptx_bytes": 0, "target": None, "error": traceback.format_exc(limit=3)}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
