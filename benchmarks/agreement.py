"""How often greedy linear self-speculation emits the token greedy AR emits, on the demo model's held-out scenes.

In exact arithmetic the two are equal (every emitted linear_spec token is the verify forward's argmax); in
floating point a multi-token verify and a one-token AR step round differently. This reports the agreement rate
per dtype: over every request, the positions of the AR completion (up to and including its EOS) where the
linear_spec completion (cut to the same budget) holds the same token.

    python -m benchmarks.agreement [--n 50] [--seed 20261123] [--dtypes float32 bfloat16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import nemotron_fast
from nemotron_fast.demo import default_model_path
from nemotron_fast.demo.scenes import DESCRIBE_PROMPTS, make_scene, scene_seed
from nemotron_fast.sampling import SamplingPolicy

__all__ = ["agreement", "main"]


def agreement(model: Any, n: int, seed: int, max_tokens: int, block_length: int = 32) -> dict[str, Any]:
    """Token agreement of linear_spec (threshold 0) with AR over ``n`` eval scenes, each described and asked."""
    same = total = requests = exact = 0
    eos = set(model.config.eos_token_ids)
    for i in range(n):
        scene = make_scene(scene_seed("eval", seed, i))
        for question in (DESCRIBE_PROMPTS[i % len(DESCRIBE_PROMPTS)], *(qa.question for qa in scene.qa)):
            inp = model.processor.build_inputs(question, [scene.image])
            args = (inp.input_ids, inp.pixel_values, inp.image_sizes)
            ar = nemotron_fast.generate(model, *args, max_new_tokens=max_tokens, mode="ar").completion_ids[0]
            spec = nemotron_fast.generate(model, *args, max_new_tokens=max_tokens, block_length=block_length,
                                          threshold=0.0, mode="linear_spec",
                                          policy=SamplingPolicy(truncate_overshoot=True)).completion_ids[0]
            cut = next((k + 1 for k, t in enumerate(ar) if t in eos), len(ar))
            same += sum(a == b for a, b in zip(ar[:cut], spec[:cut]))
            total += cut
            exact += ar[:cut] == spec[:cut]
            requests += 1
    return {"token_agreement": same / max(total, 1), "requests_identical": exact / max(requests, 1),
            "tokens": total, "requests": requests}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="held-out scenes (each described and asked every question)")
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a = ap.parse_args(argv)
    out = {}
    for dtype in a.dtypes:
        model = nemotron_fast.load(default_model_path(), dtype=dtype)
        out[dtype] = agreement(model, a.n, a.seed, a.max_tokens)
        print(f"# {dtype}: {json.dumps(out[dtype])}")
    print(json.dumps({"n": a.n, "seed": a.seed, "max_tokens": a.max_tokens, **out}))


if __name__ == "__main__":
    main()
