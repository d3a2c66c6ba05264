"""End-to-end benchmark runner: ``nemotron-fast bench`` or ``python -m benchmarks.run`` (same options).

For every configuration of the chosen matrix (see :mod:`benchmarks.matrix`), in one process:

1. warm-up: one untimed call of the reference and of the fast sampler (default policy) - and the parity gate:
   completion ids, NFE and reveal trace must be identical, or the run stops, prints no speedup and exits 1;
2. timed rounds over the contenders - reference, fast, fast with each opt-in policy (different algorithms: no
   parity claim, reported by policy name), batched fast decoding - and the floor replays of their GEMMs
   (:mod:`benchmarks.floor`), interleaved (:mod:`benchmarks.measure`);
3. one row per sampler contender (:mod:`benchmarks.report`), plus accuracy on the demo eval scenes when the
   model is the demo model.

Nothing timed is printed before all configurations passed the gate; the table goes to stdout at the end, then
(for ``--preset issue6``) the acceptance line, and the last stdout line is one JSON document with every row,
which is also appended to ``benchmarks/results/history.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import measure
from .floor import Floor, cuda_bandwidth, run_gemms
from .matrix import (
    MODELS,
    Config,
    Preset,
    build_batch,
    build_prompt,
    configs_for,
    demo_path,
    model_path,
    resolve_preset,
)
from .measure import Contender, ParityError, check_parity, policy_from_name, run_rounds, timed_call
from .report import RESULTS_DIR, append_history, environment, format_table, hardware_line, readme_table, write_plot

__all__ = ["run", "main", "bench_config"]

_PHASES = ("vision", "prefill", "denoise", "select", "commit")


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _row(model: Any, cfg: Config, c: Contender, *, sampler: str, policy: str, batch: int, prompt_tokens: int,
         params: int, floor: Contender | None) -> dict[str, Any]:
    """One result row from a contender's median sample."""
    s = c.median_sample
    res = s.result
    blocks = max(res.nfe - len(res.trace), 1)
    row_nfe = res.row_nfe or [res.nfe] * len(res.completion_ids)
    per_row_tpf = [len(ids) / max(n, 1) for ids, n in zip(res.completion_ids, row_nfe)]
    tokens = res.num_completion_tokens
    split = {k: round(float(res.timings.get(k, 0.0)), 4) for k in _PHASES}
    floor_s = floor.floor_seconds if floor is not None and floor.floor_values else None
    row: dict[str, Any] = {
        "model": cfg.model, "params_m": params / 1e6, "prompt": cfg.prompt, "prompt_tokens": prompt_tokens,
        "max_tokens": cfg.max_tokens, "block_length": cfg.block_length, "threshold": cfg.threshold,
        "steps": cfg.steps, "sampler": sampler, "policy": policy, "batch": batch,
        "completion_tokens": tokens,
        "masks_left": sum(t == model.config.mask_token_id for ids in res.completion_ids for t in ids),
        "nfe": res.nfe, "blocks": blocks,
        "tokens_per_forward": statistics.fmean(per_row_tpf), "nfe_per_block": res.nfe / blocks,
        "time_s": s.wall, "times_s": [round(x.wall, 4) for x in c.samples],
        "cpu_s": s.cpu, "tokens_per_s": tokens / s.wall, "split_s": split,
        "peak_mem_mib": round(s.peak_mib, 1),
        "peak_total_mib": round(s.peak_total_mib, 1) if s.peak_total_mib is not None else None,
        "accuracy": None, "floor_s": floor_s, "floor_ratio": s.wall / floor_s if floor_s else None,
        "floor_gflop": floor.call.flops / 1e9 if floor is not None and floor.floor_values else None,
        "speedup_vs_reference": None, "parity": None,
        "bandwidth": cuda_bandwidth(model, res, split["denoise"] + split["select"] + split["commit"], batch=batch,
                                    context=prompt_tokens + tokens // (2 * max(batch, 1))),
    }
    return row


class _LazyFloor:
    """A floor replay built on first use from a contender's result (its trace gives the GEMM list)."""

    def __init__(self, model: Any, source: Contender, prompt: Any, cfg: Config, warm: Any | None = None) -> None:
        self.model, self.source, self.prompt, self.cfg, self.warm = model, source, prompt, cfg, warm
        self.floor: Floor | None = None

    @property
    def flops(self) -> int:
        return self.floor.flops if self.floor is not None else 0

    def __call__(self) -> float:
        if self.floor is None:
            res = self.warm if self.warm is not None else self.source.samples[0].result
            ids = self.prompt.ids
            plen = ids.shape[1] if isinstance(ids, torch.Tensor) else max(len(r) for r in ids)
            gemms = run_gemms(self.model.config, res, rows=self.prompt.rows, prompt_len=plen,
                              block_length=self.cfg.block_length, image_sizes=self.prompt.image_sizes)
            self.floor = Floor(gemms, self.model.dtype, self.model.device)
        return self.floor.measure()


def bench_config(model: Any, cfg: Config, preset: Preset, params: int) -> list[dict[str, Any]]:
    """Warm-up + parity gate, timed rounds and rows of one configuration (raises :class:`ParityError`)."""
    device = model.device
    kw = dict(max_new_tokens=cfg.max_tokens, steps=cfg.steps, block_length=cfg.block_length, threshold=cfg.threshold)
    prompt = build_prompt(model, cfg.prompt)

    def caller(which: str, p: Any, policy_name: str) -> Any:
        policy = policy_from_name(policy_name)
        # looked up at call time, so a test can swap measure.fast_generate
        return lambda: getattr(measure, f"{which}_generate")(model, p.ids, p.pixel_values, p.image_sizes,
                                                             policy=policy, **kw)

    ref = Contender("reference", caller("reference", prompt, ""))
    fast = Contender("fast", caller("fast", prompt, ""))
    _log(f"{cfg.label}: prompt {prompt.tokens} tokens; warm-up and parity check")
    ref_warm = timed_call(ref.call, device).result
    fast_warm = timed_call(fast.call, device).result
    check_parity(cfg.label, ref_warm, fast_warm)
    _log(f"{cfg.label}: parity ok (completion ids, NFE {fast_warm.nfe}, reveal trace identical)")

    samplers: list[tuple[Contender, str, str, int, Any]] = [(ref, "reference", "default", 1, prompt),
                                                             (fast, "fast", "default", 1, prompt)]
    floors: dict[str, Contender] = {}
    # one floor for both: after the gate they ran the same algorithm (same trace), so the same necessary GEMMs
    lazy = _LazyFloor(model, fast, prompt, cfg, warm=fast_warm)
    floors["reference"] = floors["fast"] = Contender("floor", lazy, kind="floor")
    for name in preset.policies:
        # no warm-up of their own: same code path and shapes as the fast sampler, which is warm now
        c = Contender(f"fast:{name}", caller("fast", prompt, name))
        samplers.append((c, c.name, name, 1, prompt))
        floors[c.name] = Contender(f"floor:{name}", _LazyFloor(model, c, prompt, cfg), kind="floor")
    for b in preset.batches:
        if b == 1:
            continue
        bp = build_batch(model, cfg.prompt, b)
        c = Contender(f"fast:batch{b}", caller("fast", bp, ""))
        _log(f"{cfg.label}: warm-up {c.name}")
        warm = timed_call(c.call, device).result
        samplers.append((c, c.name, "default", b, bp))
        floors[c.name] = Contender(f"floor:batch{b}", _LazyFloor(model, c, bp, cfg, warm=warm), kind="floor")

    contenders = [s[0] for s in samplers] + list({id(f): f for f in floors.values()}.values())
    run_rounds(contenders, preset.reps, device, progress=lambda m: _log(f"{cfg.label}: {m}"))

    rows = []
    for c, name, policy, batch, p in samplers:
        row = _row(model, cfg, c, sampler=name, policy=policy, batch=batch, prompt_tokens=p.tokens, params=params,
                   floor=floors[name])
        if name == "fast":
            row["speedup_vs_reference"] = ref.median_wall / c.median_wall
            row["parity"] = "exact"
        rows.append(row)
    for f in {id(f): f for f in floors.values()}.values():
        f.call.floor.release()
    return rows


def _add_accuracy(model: Any, rows: list[dict[str, Any]], n: int, cache: dict[tuple, dict[str, Any]]) -> None:
    """Demo model: accuracy of each batch-1 sampler row's algorithm on ``n`` eval scenes (cached per algorithm)."""
    from .accuracy import demo_accuracy

    for row in rows:
        if row["batch"] != 1:
            continue
        which = "reference" if row["sampler"] == "reference" else "fast"
        key = (which, row["policy"], row["max_tokens"], row["block_length"], row["threshold"], row["steps"])
        if key not in cache:
            _log(f"demo accuracy: {row['sampler']} max{row['max_tokens']} L{row['block_length']} "
                 f"thr{row['threshold']} on {n} eval scenes")
            cache[key] = demo_accuracy(model, getattr(measure, f"{which}_generate"),
                                       policy=policy_from_name("" if row["policy"] == "default" else row["policy"]),
                                       max_tokens=row["max_tokens"], block_length=row["block_length"],
                                       threshold=row["threshold"], steps=row["steps"], n=n)
        row["accuracy"] = cache[key]["accuracy"]
        row["accuracy_questions"] = cache[key]["questions"]
        row["accuracy_tokens_per_forward"] = cache[key]["tokens_per_forward"]


def _bench_model(name: str, preset: Preset, args: argparse.Namespace, demo: Path | None,
                 device: torch.device) -> list[dict[str, Any]]:
    import nemotron_fast
    from nemotron_fast import reference

    spec = MODELS[name]
    path = model_path(spec, args.ckpt_dir, demo)
    _log(f"model {name}: {path}")
    model = nemotron_fast.load(path, device=device, dtype=torch.float32)
    # counted before the twin is attached: get_twin caches it on the model, where it registers as a submodule
    params = sum(p.numel() for p in model.parameters())
    reference.get_twin(model)  # load the reference's transformers twin now, outside every timed call
    rows: list[dict[str, Any]] = []
    for cfg in configs_for(preset, name):
        if cfg.prompt != "text" and not model.config.is_vlm:
            _log(f"{cfg.label}: skipped (a text-only checkpoint takes no image)")
            continue
        rows += bench_config(model, cfg, preset, params)
    if spec.is_demo and preset.eval_n > 0:
        _add_accuracy(model, rows, preset.eval_n, {})
    del model
    gc.collect()
    return rows


def _issue6_line(rows: list[dict[str, Any]]) -> str | None:
    ref = next((r for r in rows if r["sampler"] == "reference"), None)
    fast = next((r for r in rows if r["sampler"] == "fast"), None)
    if ref is None or fast is None:
        return None
    ratio = fast["speedup_vs_reference"]
    return (f"issue6: {fast['model']} ({fast['params_m']:.1f}M params, Tekken vocab), prompt {fast['prompt_tokens']} "
            f"image+text tokens, {fast['max_tokens']} new tokens, threshold {fast['threshold']}, {fast['steps']} "
            f"steps, block {fast['block_length']} | same tokens, NFE and trace: asserted | reference "
            f"{ref['tokens_per_s']:.2f} tok/s | fast {fast['tokens_per_s']:.2f} tok/s | ratio {ratio:.2f}x "
            f"({'meets' if ratio >= 1.5 else 'below'} the 1.5x acceptance) | tokens/forward "
            f"{fast['tokens_per_forward']:.2f} | NFE/block {fast['nfe_per_block']:.2f} | {fast['masks_left']} of the "
            f"{fast['completion_tokens']} completion tokens are MASK ids the step budget left unrevealed")


def _set_threads(choice: str, device: torch.device) -> str:
    """Apply ``--threads`` and say what was chosen and why."""
    if choice != "auto":
        n = int(choice)
        if n < 1:
            raise ValueError(choice)
        torch.set_num_threads(n)
        return f"{n} (--threads)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if device.type == "cpu" and cores > 1 and load >= cores / 2:
        torch.set_num_threads(1)
        return f"1 (auto: load average {load:.1f} on {cores} cores)"
    return f"{torch.get_num_threads()} (auto: torch default)"


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: reference and fast tokens/s and the speedup (parity held for every one of them)."""
    out = []
    for fast in (r for r in rows if r["sampler"] == "fast"):
        key = {k: fast[k] for k in ("model", "prompt", "max_tokens", "block_length", "threshold")}
        ref = next(r for r in rows if r["sampler"] == "reference" and all(r[k] == v for k, v in key.items()))
        out.append({**key, "reference_tokens_per_s": ref["tokens_per_s"], "fast_tokens_per_s": fast["tokens_per_s"],
                    "speedup": fast["speedup_vs_reference"], "tokens_per_forward": fast["tokens_per_forward"],
                    "nfe_per_block": fast["nfe_per_block"]})
    return out


def _options(args: argparse.Namespace) -> list[str]:
    """The command-line options of this run (for the README's reproduce line)."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    return list(argv)


def _args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`nemotron_fast.bench.add_bench_arguments`); returns
    the exit status: 0, 1 on a parity failure, 2 on bad arguments."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        preset = resolve_preset(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    try:
        threads_note = _set_threads(str(args.threads), device)
    except ValueError:
        print(f"error: --threads must be an integer >= 1 or 'auto', got {args.threads!r}", file=sys.stderr)
        return 2
    env = environment(device)
    env["threads_choice"] = threads_note
    demo = demo_path(args.demo_model)
    models = [m for m in preset.models if not (MODELS[m].is_demo and demo is None)]
    if len(models) < len(preset.models):
        _log("demo model not installed: its rows are skipped (they appear once nemotron_fast/demo/assets/model "
             "exists, or pass --demo-model)")
    command = "nemotron-fast bench " + " ".join(shlex.quote(a) for a in _options(args))
    doc: dict[str, Any] = {"status": "ok", "preset": preset.name, "env": env, "args": _args_record(args),
                           "models": models, "demo_model": str(demo) if demo else None}
    history = None if args.no_history else (args.history or RESULTS_DIR / "history.jsonl")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for name in models:
            rows += _bench_model(name, preset, args, demo, device)
    except ParityError as exc:
        print(f"PARITY FAILURE - the fast sampler does not reproduce the reference; no timing is reported.\n{exc}")
        doc.update(status="parity_failure", error=str(exc), rows=[])
        if history is not None:
            append_history(history, doc)
        print(json.dumps(doc, sort_keys=True))
        return 1
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    doc.update(rows=rows, wall_s=round(time.perf_counter() - t0, 1), summary=_summary(rows))
    print(f"# {hardware_line(env)}")
    print(format_table(rows))
    out_dir = args.out or RESULTS_DIR / f"latest-{preset.name}"
    if not args.no_plot and rows:
        title = f"nemotron-fast bench --preset {preset.name}: {hardware_line(env)}"
        plot = write_plot(rows, out_dir / "bench.png", title)
        doc["plot"] = str(plot) if plot else None
    if preset.name == "issue6":
        line = _issue6_line(rows)
        doc["issue6"] = line
        if line:
            print(line)
    if args.write_readme_table:
        path = RESULTS_DIR.parent / "README_TABLE.md" if args.write_readme_table is True else args.write_readme_table
        path.write_text(readme_table(rows, env, command))
        doc["readme_table"] = str(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    if history is not None:
        append_history(history, doc)
    print(json.dumps(doc, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run [options]`` (the options of ``nemotron-fast bench``)."""
    from nemotron_fast.bench import add_bench_arguments, load_dispatch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    status = load_dispatch(args)  # --serve: the load benchmark (benchmarks/load.py)
    return run(args) if status is None else status


if __name__ == "__main__":
    sys.exit(main())
