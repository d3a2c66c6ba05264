"""Python stages of the one-shot device check; ``benchmarks/gpu/run.sh`` runs each in its own time-boxed process.

``python -m benchmarks.gpu.check STAGE --out DIR [--dry-run] [--budget SECONDS]`` writes ``DIR/STAGE.json``:

- ``kernels``: measured copy bandwidth and matmul throughput, then the sampler's kernels at the model's shapes
  (median of ``triton.testing.do_bench`` on CUDA): the fused head kernel against cuBLAS ``F.linear`` + a torch
  reduction (:func:`bench_head`) and the select/unmask op, each with achieved GB/s and TFLOP/s;
- ``samplers``: a random model of the NLD-8B text shape built on the device (no disk: :data:`NLD_8B` holds the
  sizes), an fp32 exact-parity gate, then reference vs fast in bf16 at batch 1, 8 and 32 (1k-token prompts,
  512 new tokens), timed with CUDA events, with token agreement, NFE, forwards and the roofline line;
- ``table``: merges every ``DIR/*.json`` (the shell stages included) into ``DIR/summary.json`` and prints one
  table.

``--dry-run`` runs the same code on the CPU with the config of a tiny checkpoint
(:func:`nemotron_fast.testing.write_tiny_checkpoint`) and small sizes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# The NLD-8B text backbone, from /work/shared/spec/nld-model.md ("Text backbone" table and "Config ids"): the one
# place these sizes live. No checkpoint exists on the device, so the real run builds this shape with random weights.
NLD_8B: dict[str, Any] = {
    "sizes": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, block_size=32),
    "token_ids": dict(vocab_size=131072, mask_token_id=100, eos_token_id=11, bos_token_id=1, pad_token_id=11),
}

# Run sizes: (real, dry-run).
PROMPT_TOKENS = (1024, 16)
NEW_TOKENS = (512, 64)
BATCHES = ((1, 8, 32), (1, 2, 4))
GATE = dict(batch=1, prompt=(64, 12), new=(64, 32))


# ---- timing ----------------------------------------------------------------------------------------------------

def bench_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, else a perf_counter median."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)``: CUDA events around the call on CUDA (with a sync before), perf_counter elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of an ``nbytes`` buffer)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms / 1e3)


def matmul_flops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """Measured ``[n, n] @ [n, n]`` throughput in FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms / 1e3)


# ---- kernels ---------------------------------------------------------------------------------------------------

def bench_head(rows: int, vocab: int, hidden: int, device: torch.device, dtype: torch.dtype,
               temperature: float = 0.0) -> dict[str, Any]:
    """The fused head kernel (:func:`head_confidence_argmax`) against cuBLAS ``F.linear`` + a torch reduction
    (argmax and softmax confidence over the written logits), on one ``[rows, hidden] x [vocab, hidden]`` problem.

    Returns the median ms of each, the weight-streaming GB/s and TFLOP/s of each, the faster one's name, and
    whether both chose the same tokens (greedy; at ``temperature > 0`` both use the same Philox draw).
    """
    from nemotron_fast.kernels.head_confidence import head_confidence_argmax, head_confidence_argmax_ref

    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) * hidden**-0.5
    kw: dict[str, Any] = dict(temperature=temperature)
    if temperature > 0:
        kw.update(seed=1, offset=0)

    def fused() -> Any:
        return head_confidence_argmax(h, w, **kw)

    def unfused() -> Any:
        if temperature > 0:
            return head_confidence_argmax_ref(h, w, chunk=rows, **kw)
        logits = F.linear(h, w)
        x0 = logits.argmax(-1)
        return x0, torch.softmax(logits, -1, dtype=torch.float32).gather(-1, x0[:, None])

    same = bool(torch.equal(fused()[0], unfused()[0]))
    ms_fused, ms_unfused = bench_ms(fused, device), bench_ms(unfused, device)
    nbytes = w.numel() * w.element_size()
    flops = 2 * rows * vocab * hidden
    return {"rows": rows, "vocab": vocab, "hidden": hidden, "dtype": str(dtype).removeprefix("torch."),
            "temperature": temperature, "fused_ms": ms_fused, "linear_ms": ms_unfused,
            "fused_gbps": nbytes / ms_fused / 1e6, "linear_gbps": nbytes / ms_unfused / 1e6,
            "fused_tflops": flops / ms_fused / 1e9, "linear_tflops": flops / ms_unfused / 1e9,
            "faster": "fused" if ms_fused <= ms_unfused else "linear", "same_tokens": same}


def stage_kernels(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = _config(args)
    t = cfg.text
    out: dict[str, Any] = {"device": _device_name(device)}
    out["copy_gbps"] = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20)) / 1e9
    out["matmul_tflops"] = matmul_flops(device, 8192 if device.type == "cuda" else 512, dtype) / 1e12
    out["head"] = []
    _save_partial(args, out)
    # greedy first: T > 0 compiles the Philox variants (the slowest autotuning), so it goes last
    for temperature in (0.0, 1.0):
        for batch in BATCHES[0] if not args.dry_run else (1,):
            out["head"].append(bench_head(batch * cfg.block_size, t.vocab_size, t.hidden_size, device, dtype,
                                          temperature))
            _save_partial(args, out)
    from nemotron_fast.kernels.unmask import select_unmask

    b = max(BATCHES[1 if args.dry_run else 0])
    conf = torch.rand(b, cfg.block_size, device=device).to(dtype)
    x0 = torch.randint(0, t.vocab_size, (b, cfg.block_size), device=device)
    block = torch.full_like(x0, cfg.mask_token_id)
    ms = bench_ms(lambda: select_unmask(x0, conf, block.clone(), block == cfg.mask_token_id, threshold=0.9), device)
    out["select_unmask"] = {"batch": b, "block": cfg.block_size, "ms": ms}
    return out


# ---- samplers --------------------------------------------------------------------------------------------------

def _config(args: argparse.Namespace) -> Any:
    from nemotron_fast.config import NLDConfig, load_config
    from nemotron_fast.testing.checkpoint import tiny_config_dict

    if args.dry_run:
        from nemotron_fast.testing import write_tiny_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="nf-gpu-dry-"))
        return load_config(write_tiny_checkpoint(tmp / "tiny", vlm=False))
    d = tiny_config_dict(NLD_8B["token_ids"], vlm=False, dtype="bfloat16", **NLD_8B["sizes"])
    return NLDConfig.from_dict(d)


def build_random_model(cfg: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Any]:
    """``(model, twin)``: an :class:`NLDModel` of ``cfg`` with random weights made on ``device`` (nothing read or
    written on disk), and the reference's transformers twin sharing the same tensors."""
    from nemotron_fast.hf_twin import TwinModel, _skip_init
    from nemotron_fast.model import NLDModel

    with torch.device("meta"):
        model = NLDModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms: around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(dtype))
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    model.reset_buffers(device)
    model.eval().requires_grad_(False)
    with _skip_init(), torch.device(device):
        twin = TwinModel(cfg, "sdpa")
    for p in twin.parameters():
        p.data = p.data.to(dtype)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    twin.eval().requires_grad_(False)
    return model, twin


def _prompts(cfg: Any, batch: int, length: int, device: torch.device, seed: int) -> torch.Tensor:
    """Random prompt ids that avoid the MASK and EOS ids."""
    gen = torch.Generator().manual_seed(seed)
    banned = torch.tensor([cfg.mask_token_id, *cfg.eos_token_ids])
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    while bool(torch.isin(ids, banned).any()):
        ids = torch.where(torch.isin(ids, banned), torch.randint(0, cfg.vocab_size, ids.shape, generator=gen), ids)
    return ids.to(device)


def agreement(ref: list[list[int]], fast: list[list[int]]) -> float:
    """Fraction of positions (over the reference's tokens, compared up to each row's shorter length) that match."""
    total = sum(len(r) for r in ref)
    same = sum(a == b for r, f in zip(ref, fast) for a, b in zip(r, f))
    return same / total if total else 1.0


def stage_samplers(args: argparse.Namespace) -> dict[str, Any]:
    import nemotron_fast
    from nemotron_fast import reference

    from ..floor import kv_bytes_per_forward, weight_bytes_per_forward
    from ..measure import ParityError, check_parity

    device = _device(args)
    i = 1 if args.dry_run else 0
    deadline = time.monotonic() + args.budget
    cfg = _config(args)
    out: dict[str, Any] = {"device": _device_name(device), "rows": [], "notes": []}
    gen_kw = dict(block_length=cfg.block_size, threshold=0.9)

    # 1. the gate: fp32, fast == reference exactly (tokens, NFE, reveal trace)
    model, twin = build_random_model(cfg, device, torch.float32)
    ids = _prompts(cfg, GATE["batch"], GATE["prompt"][i], device, seed=1)
    new = GATE["new"][i]
    try:
        ref = reference.generate(twin, ids, max_new_tokens=new, **gen_kw)
        fast = nemotron_fast.generate(model, ids, max_new_tokens=new, **gen_kw)
        check_parity("fp32 gate", ref, fast)
        out["gate"] = {"ok": True, "dtype": "float32", "tokens": new, "nfe": fast.nfe}
    except ParityError as exc:
        out["gate"] = {"ok": False, "dtype": "float32", "error": str(exc)}
    _save_partial(args, out)
    del model, twin
    _free(device)

    # 2. bf16 on CUDA (the real checkpoint's dtype), fp32 in the dry run (bf16 matmuls are slow on a CPU)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, twin = build_random_model(cfg, device, dtype)
    wbytes = weight_bytes_per_forward(model)
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    prompt, new = PROMPT_TOKENS[i], NEW_TOKENS[i]
    for batch in BATCHES[i]:
        row: dict[str, Any] = {"batch": batch, "prompt": prompt, "new_tokens": new,
                               "dtype": str(dtype).removeprefix("torch."), "ok": False, "error": "did not finish"}
        out["rows"].append(row)
        _save_partial(args, out)
        try:
            if time.monotonic() > deadline:
                raise TimeoutError("stage budget spent before this batch size")
            ids = _prompts(cfg, batch, prompt, device, seed=batch)
            call = dict(max_new_tokens=new, **gen_kw)
            nemotron_fast.generate(model, ids, **call)  # warm-up: autotune, graph capture
            fast, fast_s = timed(functools.partial(nemotron_fast.generate, model, ids, **call), device)
            row.update(fast_s=fast_s, fast_tok_s=batch * new / fast_s, nfe=fast.nfe,
                       forwards=getattr(fast, "forwards", None))
            # the reference may not fit the budget at every size: fewer tokens when time is short
            left = deadline - time.monotonic()
            ref_new = new if left > 6 * fast_s * max(1, batch // 4) else max(cfg.block_size, new // 4)
            ref, ref_s = timed(functools.partial(reference.generate, twin, ids, max_new_tokens=ref_new, **gen_kw),
                               device)
            row.update(ref_tokens=ref_new, ref_s=ref_s, ref_tok_s=batch * ref_new / ref_s, ref_nfe=ref.nfe)
            fast_cut = [r[:ref_new] for r in fast.completion_ids]
            row["agreement"] = agreement(ref.completion_ids, fast_cut)
            if ref_new == new:
                row["nfe_within_1pct"] = abs(fast.nfe - ref.nfe) <= 0.01 * ref.nfe
            row["speedup"] = row["fast_tok_s"] / row["ref_tok_s"]
            # the bf16 gate (after the fp32 exact one): >= 0.99 token agreement and NFE within 1%
            row["bf16_gate"] = row["agreement"] >= 0.99 and row.get("nfe_within_1pct", True)
            fwd = row["forwards"] or fast.nfe + 1
            context = prompt + new // 2  # the mean cached length over the run
            floor_s = (wbytes + kv_bytes_per_forward(model, batch, context)) / bandwidth
            row.update(ms_per_forward=fast_s / fwd * 1e3, floor_ms_per_forward=floor_s * 1e3,
                       measured_over_floor=fast_s / fwd / floor_s)
            row["ok"] = True
            del row["error"]
        except Exception as exc:  # a failing batch size is reported, the next still runs
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        _save_partial(args, out)
        _free(device)
    out["weight_bytes_per_forward"] = wbytes
    out["copy_gbps"] = bandwidth / 1e9
    out["notes"].append("random weights: confidences stay far below 0.9, so each step reveals about one token "
                        "(the worst-case NFE); bf16 near-ties of random logits lower token agreement")
    if not args.dry_run:
        out["notes"].append("the reference runs fewer new tokens where the stage budget is short (column 'ref "
                            "tokens'); agreement is then over those tokens and NFE is not compared")
    return out


# ---- table -----------------------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def stage_table(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out)
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.stem != "summary"}
    lines = ["| stage | status | detail |", "|---|---|---|"]
    for name in ("env", "build", "tests", "kernels", "samplers"):
        d = parts.get(name)
        if d is None:
            lines.append(f"| {name} | MISSING | no {name}.json (stage did not finish) |")
            continue
        status = "ok" if d.get("ok", True) and "error" not in d else "FAILED"
        detail = d.get("detail") or d.get("error") or ""
        if name == "kernels" and "select_unmask" in d:
            detail = (f"copy {_fmt(d['copy_gbps'], '.0f')} GB/s, matmul {_fmt(d['matmul_tflops'], '.1f')} TFLOP/s; "
                      f"select_unmask {_fmt(d['select_unmask']['ms'], '.3f')} ms")
        if name == "samplers" and "gate" in d:
            detail = f"fp32 gate: {'exact' if d['gate']['ok'] else 'FAILED ' + d['gate'].get('error', '')[:200]}"
        if status == "FAILED" and d.get("error") and d["error"] not in str(detail):
            detail = f"{detail}; {d['error']}"
        lines.append(f"| {name} | {status} | {str(detail).replace('|', '/')[:300]} |")
    k = parts.get("kernels", {})
    if k.get("head"):
        lines += ["", "| head rows | T | fused ms | F.linear+torch ms | fused GB/s | fused TFLOP/s | faster | "
                  "same tokens |", "|---|---|---|---|---|---|---|---|"]
        for h in k["head"]:
            lines.append(f"| {h['rows']} | {h['temperature']} | {_fmt(h['fused_ms'], '.3f')} | "
                         f"{_fmt(h['linear_ms'], '.3f')} | {_fmt(h['fused_gbps'], '.0f')} | "
                         f"{_fmt(h['fused_tflops'], '.1f')} | {h['faster']} | {_fmt(h['same_tokens'])} |")
    s = parts.get("samplers", {})
    if s.get("rows"):
        lines += ["", "| batch | prompt | new | ref tokens | ref tok/s | fast tok/s | speedup | agreement | NFE | "
                  "NFE within 1% | bf16 gate | forwards | ms/forward | floor ms | measured/floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            if not r.get("ok"):
                lines.append(f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | FAILED: "
                             f"{str(r.get('error', '')).replace('|', '/')[:200]} ||||||||||||")
                continue
            lines.append(f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['ref_tokens']} | "
                         f"{_fmt(r['ref_tok_s'], '.1f')} | {_fmt(r['fast_tok_s'], '.1f')} | "
                         f"{_fmt(r['speedup'], '.2f')}x | {_fmt(r['agreement'], '.4f')} | {r['nfe']} | "
                         f"{_fmt(r.get('nfe_within_1pct'))} | {_fmt(r['bf16_gate'])} | {_fmt(r['forwards'])} | "
                         f"{_fmt(r['ms_per_forward'], '.2f')} | {_fmt(r['floor_ms_per_forward'], '.2f')} | "
                         f"{_fmt(r['measured_over_floor'], '.2f')} |")
        for note in s.get("notes", []):
            lines.append(f"note: {note}")
    table = "\n".join(lines)
    summary = {"stages": parts, "table": table}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(table)
    return {}


# ---- plumbing --------------------------------------------------------------------------------------------------

def _device(args: argparse.Namespace) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run with --dry-run on a machine without a GPU")
    return torch.device("cuda")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def _save_partial(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Write what a stage has measured so far as ``DIR/STAGE.json`` marked incomplete, so a stage killed by its
    time box still reports its finished parts; the stage's final write replaces it."""
    partial = {**out, "ok": False, "error": "incomplete: the stage stopped (time box) after the parts shown"}
    (Path(args.out) / f"{args.stage}.json").write_text(json.dumps(partial, indent=1, default=str))


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


STAGES = {"kernels": stage_kernels, "samplers": stage_samplers, "table": stage_table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", required=True, help="folder for STAGE.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny checkpoint, small sizes")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds this stage may spend (samplers)")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        stage_table(args)
        return 0
    t0 = time.monotonic()
    (Path(args.out) / f"{args.stage}.json").unlink(missing_ok=True)  # no stale record merged on failure
    try:
        with torch.inference_mode():
            result = STAGES[args.stage](args)
        code = 0
    except Exception as exc:
        traceback.print_exc()
        # keep the parts measured before the failure (the stage's partial write), then say what failed
        path = Path(args.out) / f"{args.stage}.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        result, code = {**done, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}, 1
    result["seconds"] = round(time.monotonic() - t0, 1)
    (Path(args.out) / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
