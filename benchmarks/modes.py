"""The three decoding modes of the same weights side by side: block diffusion, AR and linear self-speculation.

One process, one model: each mode's fast path is first checked against its reference (same tokens, NFE and, for
linear_spec, acceptance trace; a :class:`~benchmarks.measure.ParityError` stops the run before any number is
printed), then the fast paths are timed in interleaved rounds (:func:`benchmarks.measure.run_rounds`, warm-up
excluded) and reported as tokens/s, tokens per forward (completion tokens / NFE), NFE and the speed ratio to
diffusion. The last stdout line is one JSON document.

    python -m benchmarks.modes [--model DIR] [--max-tokens 64] [--block-length 32] [--threshold 0.9] [--reps 5]
    nemotron-fast bench --preset modes [--models DIR] ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import nemotron_fast
from nemotron_fast import reference

from .measure import Contender, ParityError, check_parity, run_rounds

__all__ = ["run_modes", "main", "run_from_bench_args"]

MODES = ("diffusion", "ar", "linear_spec")


def _prompts(model: Any, n: int) -> list[tuple[torch.Tensor, Any, Any]]:
    """Image + question prompts through the checkpoint's processor when it can build them (the demo model's
    scenes), else question text alone."""
    questions = ["Describe the image.", "What colour is the square?", "How many stars are there?",
                 "What shape is the orange object?"][:n]
    try:
        from PIL import Image

        from nemotron_fast.demo import default_model_path  # noqa: F401  (the demo assets ship with the package)

        image = Image.open(Path(nemotron_fast.__file__).parent / "demo" / "assets" / "example.png").convert("RGB")
        out = []
        for q in questions:
            inp = model.processor.build_inputs(q, [image])
            out.append((inp.input_ids, inp.pixel_values, inp.image_sizes))
        return out
    except Exception as exc:  # the processor cannot build image prompts for this checkpoint: text prompts
        print(f"[modes] image prompts unavailable ({exc}); timing text prompts", file=sys.stderr)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model.checkpoint_path) / "tokenizer.json"))
    return [(torch.tensor([tok.encode(q, add_special_tokens=False).ids]), None, None) for q in questions]


def run_modes(model: Any, *, max_tokens: int, block_length: int, threshold: float, reps: int,
              spec_threshold: float = 0.0, n_prompts: int = 2) -> dict[str, Any]:
    """Parity-gate and time the three modes on ``model``; returns the result document."""
    device = model.device
    prompts = _prompts(model, n_prompts)
    nb = -(-max_tokens // block_length)
    kw = {"diffusion": dict(steps=nb * block_length, threshold=threshold),
          "ar": {}, "linear_spec": dict(threshold=spec_threshold)}
    for mode in MODES:
        for i, (ids, pix, sizes) in enumerate(prompts):
            call = dict(max_new_tokens=max_tokens, block_length=block_length, mode=mode, **kw[mode])
            ref = reference.generate(model, ids, pix, sizes, **call)
            fast = nemotron_fast.generate(model, ids, pix, sizes, **call)
            check_parity(f"{mode} prompt {i}", ref, fast)
            if fast.spec_trace != ref.spec_trace:
                raise ParityError(f"parity failure on {mode} prompt {i}: the acceptance trace differs")

    def make(mode: str) -> Contender:
        def call() -> list[Any]:
            return [nemotron_fast.generate(model, ids, pix, sizes, max_new_tokens=max_tokens,
                                           block_length=block_length, mode=mode, **kw[mode])
                    for ids, pix, sizes in prompts]

        call()  # warm-up, untimed
        return Contender(mode, call)

    contenders = [make(m) for m in MODES]
    run_rounds(contenders, reps, device)
    rows = []
    base: float | None = None
    for c in contenders:
        results = c.median_sample.result
        tokens = sum(len(r.completion_ids[0]) for r in results)
        nfe = sum(r.nfe for r in results)
        accept = [a[0] for r in results for a in r.acceptance]
        rate = tokens / c.median_wall
        base = rate if base is None else base
        rows.append({"mode": c.name, "seconds": c.median_wall, "tokens": tokens, "nfe": nfe,
                     "tokens_per_s": rate, "tokens_per_forward": tokens / max(nfe, 1),
                     "speedup_vs_diffusion": rate / base,
                     "mean_accepted": sum(accept) / len(accept) if accept else None})
    return {"status": "ok", "model": str(model.checkpoint_path), "device": str(device), "dtype": str(model.dtype),
            "max_tokens": max_tokens, "block_length": block_length, "threshold": threshold,
            "spec_threshold": spec_threshold, "reps": reps,
            "prompts": len(prompts), "draft_lora": model.draft_lora is not None, "rows": rows}


def _table(doc: dict[str, Any]) -> str:
    lines = ["| mode | tokens/s | tokens per forward | NFE | mean accepted | tokens/s vs diffusion |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['tokens_per_forward']:.2f} | {r['nfe']} | {acc} "
                     f"| {r['speedup_vs_diffusion']:.2f}x |")
    return "\n".join(lines)


def run_from_bench_args(args: argparse.Namespace) -> int:
    """``nemotron-fast bench --preset modes``: the first of ``--max-tokens``, ``--block-lengths`` and
    ``--thresholds`` (defaults 64, 32, 0.9), ``--reps`` (5), ``--device``, ``--demo-model`` as the checkpoint."""
    argv = ["--device", args.device]
    for flag, values in (("--max-tokens", args.max_tokens), ("--block-length", args.block_lengths),
                         ("--threshold", args.thresholds)):
        if values and values[0] is not None:
            argv += [flag, str(values[0])]
    if args.reps:
        argv += ["--reps", str(args.reps)]
    if args.demo_model:
        argv += ["--model", str(args.demo_model)]
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.modes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9, help="diffusion's reveal threshold")
    p.add_argument("--spec-threshold", type=float, default=0.0,
                   help="linear_spec's draft threshold (default 0: upstream's one-pass draft)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    from nemotron_fast.pipeline import default_model_path

    model = nemotron_fast.load(args.model or default_model_path(), device=args.device, dtype=args.dtype)
    try:
        doc = run_modes(model, max_tokens=args.max_tokens, block_length=args.block_length,
                        threshold=args.threshold, reps=args.reps, spec_threshold=args.spec_threshold)
    except ParityError as exc:
        print(json.dumps({"status": "parity_failure", "error": str(exc)}))
        return 1
    print(_table(doc))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
