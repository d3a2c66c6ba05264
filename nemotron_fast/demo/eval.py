"""Evaluate the demo model on held-out scenes: ``python -m nemotron_fast.demo.eval --n 200 --seed S``.

Scenes come from the ``eval`` namespace (``eval:<seed>:<i>``), which training never draws from. For every scene
the model is asked for its description and every question the scene defines; decoding is the fast sampler
(:func:`nemotron_fast.generate`) at batch 1 with the endpoint's parameter rules (:func:`validate_inputs`:
``max_tokens`` 512, 256 steps rounded to the block count, block 32), once with the default threshold 0.9 and
once with ``threshold=None`` (the even top-k schedule).

Reported per mode: exact-match QA ``accuracy`` (and per question kind), description exact match and
``caption_slot_accuracy`` (the colour / shape / count / background words of the description, compared in order),
``tokens_per_forward`` (completion tokens / NFE over the descriptions; ``qa_tokens_per_forward`` for answers)
and ``nfe_per_block`` (NFE / decoded blocks). The last stdout line is one JSON document; its top-level numbers
are the threshold-0.9 (endpoint default) ones.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..params import validate_inputs
from .scenes import BACKGROUNDS, COLOURS, DESCRIBE_PROMPTS, NUMBER_WORDS, SHAPES, make_scene, scene_seed

__all__ = ["evaluate", "slot_words", "main"]

_SLOT_VOCAB = {*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBER_WORDS, "a", "an", *BACKGROUNDS}


def slot_words(text: str) -> list[str]:
    """The slot words of a description in order: counts ("a"/"an"/number words), colours, shapes, background."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return [w for w in words if w in _SLOT_VOCAB]


def _slot_accuracy(pred: str, ref: str) -> float:
    p, r = slot_words(pred), slot_words(ref)
    right = sum(a == b for a, b in zip(p, r))
    return right / max(len(p), len(r), 1)


def _decode_one(model: Any, question: str, image: Any, max_tokens: int, threshold: float | None,
                mode: str = "diffusion") -> tuple[str, int, int, int]:
    """-> (text, completion tokens, nfe, decoded blocks). ``mode`` is the decoding mode; linear_spec output is
    cut to ``max_tokens`` as the Pipeline does."""
    from ..generate import generate
    from ..sampling import SamplingPolicy

    p = validate_inputs({"image_url": "scene", "prompt": question, "max_tokens": max_tokens})
    proc = model.processor.build_inputs(question, [image])
    res = generate(model, proc.input_ids, proc.pixel_values, proc.image_sizes, max_new_tokens=p.max_tokens,
                   steps=p.steps, block_length=p.block_length, threshold=threshold, mode=mode,
                   policy=SamplingPolicy(truncate_overshoot=mode == "linear_spec"))
    ids = res.completion_ids[0]
    blocks = min(p.num_blocks, max(1, math.ceil(len(ids) / p.block_length)))
    return model.processor.decode(ids), len(ids), res.nfe, blocks


def evaluate(model: Any, n: int, seed: int, *, max_tokens: int = 512,
             thresholds: tuple[float | None, ...] = (0.9, None), progress: bool = True,
             mode: str = "diffusion") -> dict[str, Any]:
    """Run the evaluation (see the module docstring) and return the metrics per threshold of ``mode``."""
    from tqdm.auto import tqdm

    scenes = [make_scene(scene_seed("eval", seed, i)) for i in range(n)]
    modes: dict[str, Any] = {}
    for thr in thresholds:
        name = "threshold_none" if thr is None else f"threshold_{thr:g}"
        qa_right = qa_total = 0
        kinds: dict[str, list[int]] = {}
        cap_exact, cap_slots = 0, 0.0
        cap_tok = cap_nfe = qa_tok = qa_nfe = blocks = nfe_all = 0
        failures: list[dict[str, str]] = []
        for i, sc in enumerate(tqdm(scenes, desc=name, disable=not progress, dynamic_ncols=True)):
            prompt = DESCRIBE_PROMPTS[i % len(DESCRIBE_PROMPTS)]
            text, ntok, nfe, nb = _decode_one(model, prompt, sc.image, max_tokens, thr, mode)
            cap_exact += text.strip() == sc.caption
            cap_slots += _slot_accuracy(text, sc.caption)
            cap_tok, cap_nfe, blocks, nfe_all = cap_tok + ntok, cap_nfe + nfe, blocks + nb, nfe_all + nfe
            if text.strip() != sc.caption and len(failures) < 10:
                failures.append({"prompt": prompt, "expected": sc.caption, "got": text})
            for qa in sc.qa:
                text, ntok, nfe, nb = _decode_one(model, qa.question, sc.image, max_tokens, thr, mode)
                ok = text.strip() == qa.answer
                qa_right, qa_total = qa_right + ok, qa_total + 1
                kinds.setdefault(qa.kind, [0, 0])
                kinds[qa.kind][0] += ok
                kinds[qa.kind][1] += 1
                qa_tok, qa_nfe, blocks, nfe_all = qa_tok + ntok, qa_nfe + nfe, blocks + nb, nfe_all + nfe
                if not ok and len(failures) < 20:
                    failures.append({"prompt": qa.question, "expected": qa.answer, "got": text})
        modes[name] = {
            "threshold": thr,
            "accuracy": qa_right / max(qa_total, 1),
            "questions": qa_total,
            "accuracy_by_kind": {k: round(v[0] / v[1], 4) for k, v in sorted(kinds.items())},
            "caption_exact": cap_exact / max(n, 1),
            "caption_slot_accuracy": cap_slots / max(n, 1),
            "tokens_per_forward": cap_tok / max(cap_nfe, 1),
            "qa_tokens_per_forward": qa_tok / max(qa_nfe, 1),
            "nfe_per_block": nfe_all / max(blocks, 1),
            "failures": failures,
        }
    return modes


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m nemotron_fast.demo.eval --help``)."""
    ap = argparse.ArgumentParser(prog="python -m nemotron_fast.demo.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="number of held-out scenes")
    ap.add_argument("--seed", type=int, default=1, help="seed of the eval namespace")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the shipped demo model)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--no-none", action="store_true", help="skip the threshold=None pass")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--mode", choices=("diffusion", "ar", "linear_spec"), default="diffusion",
                    help="decoding mode; ar and linear_spec run one pass (linear_spec at threshold 0, upstream's "
                         "default one-pass draft)")
    a = ap.parse_args(argv)
    from ..model import load
    from . import default_model_path

    path = a.model if a.model is not None else default_model_path()
    model = load(path, dtype=torch.float32)
    t0 = time.perf_counter()
    thresholds: tuple[float | None, ...] = (0.9,) if a.no_none else (0.9, None)
    if a.mode != "diffusion":
        thresholds = (0.0,) if a.mode == "linear_spec" else (None,)
    modes = evaluate(model, a.n, a.seed, max_tokens=a.max_tokens, thresholds=thresholds,
                     progress=not a.no_progress, mode=a.mode)
    for name, m in modes.items():
        print(f"# {name}: " + json.dumps({k: v for k, v in m.items() if k != "failures"}))
        for f in m["failures"][:8]:
            print(f"#   {f['prompt']!r}: expected {f['expected']!r}, got {f['got']!r}")
    d = next(iter(modes.values()))
    summary = {"accuracy": d["accuracy"], "caption_slot_accuracy": d["caption_slot_accuracy"],
               "tokens_per_forward": d["tokens_per_forward"], "nfe_per_block": d["nfe_per_block"],
               "caption_exact": d["caption_exact"], "qa_tokens_per_forward": d["qa_tokens_per_forward"],
               "n": a.n, "seed": a.seed, "max_tokens": a.max_tokens, "model": str(path), "mode": a.mode,
               "wall_s": round(time.perf_counter() - t0, 1),
               "modes": {k: {kk: vv for kk, vv in v.items() if kk != "failures"} for k, v in modes.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
