"""Accuracy next to speed: exact-match answers on the demo model's held-out eval scenes.

The scenes are the ones :mod:`nemotron_fast.demo.eval` uses (namespace ``eval``, never seen in training); each
scene's questions are decoded at batch 1 with the row's sampler, policy and decoding parameters, and an answer
counts when its decoded text equals the scene's answer exactly (the eval's headline ``accuracy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nemotron_fast.sampling import GenerationResult, SamplingPolicy

__all__ = ["demo_accuracy"]


def demo_accuracy(model: Any, generate: Callable[..., GenerationResult], *, policy: SamplingPolicy, max_tokens: int,
                  block_length: int, threshold: float | None, steps: int, n: int, seed: int = 1) -> dict[str, Any]:
    """QA exact-match accuracy over ``n`` eval scenes -> ``{"accuracy", "tokens_per_forward", "questions",
    "scenes", "seed"}`` (tokens per forward of those answers: completion tokens / NFE, summed over questions).

    ``generate`` has the samplers' signature (``nemotron_fast.generate`` or ``reference.generate``).
    """
    from nemotron_fast.demo.scenes import make_scene, scene_seed

    right = total = tokens = nfe = 0
    for i in range(n):
        scene = make_scene(scene_seed("eval", seed, i))
        for qa in scene.qa:
            inp = model.processor.build_inputs(qa.question, [scene.image])
            res = generate(model, inp.input_ids, inp.pixel_values, inp.image_sizes, max_new_tokens=max_tokens,
                           steps=steps, block_length=block_length, threshold=threshold, policy=policy)
            right += model.processor.decode(res.completion_ids[0]).strip() == qa.answer
            total += 1
            tokens, nfe = tokens + len(res.completion_ids[0]), nfe + res.nfe
    return {"accuracy": right / max(total, 1), "tokens_per_forward": tokens / max(nfe, 1), "questions": total,
            "scenes": n, "seed": seed}
