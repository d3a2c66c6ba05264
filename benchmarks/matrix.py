"""What the runner measures: the models, the prompts, the decoding configurations and the presets.

Models are looked up by name: ``demo`` is the embedded trained model (present only once it is installed, or
given with ``--demo-model``); ``tekken-h*`` are random-weight VLM checkpoints with the real 131072-token Tekken
vocabulary at three widths up to ~100M parameters, written once into a cache directory; ``small-h64`` is a
small-vocabulary checkpoint for smoke tests. Prompts are built through each checkpoint's own processor (chat
template, Pixtral image tokens), so the prompt lengths are the ones a user would send.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelSpec", "MODELS", "Prompt", "Config", "Preset", "PRESETS", "PROMPT_KINDS", "resolve_preset",
           "model_path", "demo_path", "build_prompt", "build_batch", "endpoint_steps", "configs_for"]

PROMPT_KINDS = ("text", "image", "long")
LONG_PROMPT_TOKENS = 1000
_QUESTIONS = ("Describe the image.", "What shapes are in the image?", "How many objects are there?",
              "What colour is the background?", "Which object is on the left?", "Describe the image in one sentence.")
_FILLER = ("A red circle sits left of a blue square on a white background, and a green triangle is to the right. ")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: ``demo`` (the trained checkpoint) or a random-weight tiny checkpoint written with
    :func:`nemotron_fast.testing.write_tiny_checkpoint` and these keyword arguments."""

    name: str
    writer_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def is_demo(self) -> bool:
        return self.name == "demo"


def _tiny(name: str, **kw: Any) -> ModelSpec:
    return ModelSpec(name, tuple(sorted(kw.items())))


# Two layers each: the widths move the parameter count (dominated by the 131k-row embedding and head) from
# ~17M to ~104M. tekken-h64 is exactly issue 6's checkpoint (the writer's default sizes, 896 px images).
MODELS: dict[str, ModelSpec] = {
    "demo": ModelSpec("demo"),
    "tekken-h64": _tiny("tekken-h64", vlm=True, vocab="tekken", seed=0, vision_image_size=896),
    "tekken-h192": _tiny("tekken-h192", vlm=True, vocab="tekken", seed=0, vision_image_size=896, hidden_size=192,
                         intermediate_size=512, num_attention_heads=6, num_key_value_heads=2, head_dim=32),
    "tekken-h384": _tiny("tekken-h384", vlm=True, vocab="tekken", seed=0, vision_image_size=896, hidden_size=384,
                         intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2, head_dim=64),
    "small-h64": _tiny("small-h64", vlm=True, vocab="small", seed=0, head_scale=8.0),
}


def demo_path(override: Path | None = None) -> Path | None:
    """The demo checkpoint: ``override`` when given, else the installed one, else None (rows are skipped)."""
    if override is not None:
        return Path(override)
    try:
        from nemotron_fast.demo import default_model_path

        return default_model_path()
    except (FileNotFoundError, ImportError):
        return None


def default_ckpt_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron_fast" / "bench"


def model_path(spec: ModelSpec, ckpt_dir: Path | None, demo: Path | None = None) -> Path:
    """Directory of ``spec``'s checkpoint, writing it on first use (cached by the writer's arguments)."""
    if spec.is_demo:
        if demo is None:
            raise FileNotFoundError("the demo model is not installed")
        return demo
    from nemotron_fast.testing import write_tiny_checkpoint

    key = hashlib.sha1(json.dumps(spec.writer_kwargs).encode()).hexdigest()[:10]
    path = Path(ckpt_dir or default_ckpt_dir()) / f"{spec.name}-{key}"
    done = path / ".complete"
    if not done.is_file():
        write_tiny_checkpoint(path, **dict(spec.writer_kwargs))
        done.write_text(json.dumps(dict(spec.writer_kwargs)))
    return path


@dataclass
class Prompt:
    """Model inputs of one or more rows: ``ids`` is ``[1, T]`` for one row, a list of 1-D prompts for a batch
    (left-padded by the fast sampler); pixel values hold every row's images in order."""

    ids: torch.Tensor | list[torch.Tensor]
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    tokens: int  # prompt tokens of the longest row

    @property
    def rows(self) -> int:
        return self.ids.shape[0] if isinstance(self.ids, torch.Tensor) else len(self.ids)


def _image(size: int, row: int) -> Any:
    """A demo scene (the shapes the demo model was trained on) scaled to ``size`` pixels."""
    from PIL import Image

    from nemotron_fast.demo.scenes import make_scene, scene_seed

    img = make_scene(scene_seed("example", 0, row)).image
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)


def build_prompt(model: Any, kind: str, row: int = 0) -> Prompt:
    """One row's prompt of ``kind``: ``text`` (chat-templated question), ``image`` (one image, at most 448 px,
    plus a question) or ``long`` (the largest image the checkpoint takes, up to 880 px, plus filler text until
    the prompt has >= 1000 tokens). "The largest image the checkpoint takes" is the smaller of the image
    encoder's cap and the vision tower's ``image_size`` (the tiny test models' 224, the demo model's 112)."""
    proc, cfg = model.processor, model.config
    question = _QUESTIONS[row % len(_QUESTIONS)]
    if kind == "text":
        inp = proc.build_inputs(question)
    elif kind in ("image", "long"):
        if not cfg.is_vlm or cfg.image_encoder is None or cfg.vision is None:
            raise ValueError(f"prompt {kind!r} needs a VLM checkpoint")
        edge = min(cfg.image_encoder.max_image_size, cfg.vision.image_size)
        img = _image(min(edge, 448 if kind == "image" else 880), row)
        inp = proc.build_inputs(question, [img])
        if kind == "long" and inp.num_prompt_tokens < LONG_PROMPT_TOKENS:
            # filler sentences before the question: estimate the count from one, then top up until >= 1000
            per = proc.build_inputs(_FILLER + question, [img]).num_prompt_tokens - inp.num_prompt_tokens
            repeats = max(1, math.ceil((LONG_PROMPT_TOKENS - inp.num_prompt_tokens) / max(per, 1)))
            inp = proc.build_inputs(_FILLER * repeats + question, [img])
            while inp.num_prompt_tokens < LONG_PROMPT_TOKENS:
                repeats += 1
                inp = proc.build_inputs(_FILLER * repeats + question, [img])
    else:
        raise ValueError(f"unknown prompt kind {kind!r} (use one of {PROMPT_KINDS})")
    return Prompt(inp.input_ids, inp.pixel_values, inp.image_sizes, inp.num_prompt_tokens)


def build_batch(model: Any, kind: str, batch: int) -> Prompt:
    """``batch`` rows of ``kind`` with different questions (so, ragged lengths), one image per row if any."""
    if batch == 1:
        return build_prompt(model, kind)
    rows = [build_prompt(model, kind, r) for r in range(batch)]
    ids = [r.ids[0] for r in rows]
    pix = sizes = None
    if rows[0].pixel_values is not None:
        from nemotron_fast.processing import pad_and_stack

        pix = pad_and_stack([p for r in rows for p in r.pixel_values])
        sizes = torch.cat([r.image_sizes for r in rows])
    return Prompt(ids, pix, sizes, max(r.tokens for r in rows))


def endpoint_steps(max_tokens: int, block_length: int, steps: int | None = None) -> int:
    """The endpoint's rule: 256 steps rounded up to a multiple of the block count (or ``steps`` as given)."""
    if steps is not None:
        return steps
    blocks = math.ceil(max_tokens / block_length)
    return math.ceil(256 / blocks) * blocks


@dataclass(frozen=True)
class Config:
    """One decoding configuration of one model: every contender runs it."""

    model: str
    prompt: str
    max_tokens: int
    block_length: int
    threshold: float | None
    steps: int

    @property
    def label(self) -> str:
        thr = "none" if self.threshold is None else f"{self.threshold:g}"
        return f"{self.model}/{self.prompt}/max{self.max_tokens}/L{self.block_length}/thr{thr}"


@dataclass
class Preset:
    """A matrix: the cross product of these lists per model, and how the contenders are run."""

    name: str
    models: list[str]
    prompts: list[str]
    max_tokens: list[int]
    block_lengths: list[int]
    thresholds: list[float | None]
    policies: list[str]
    batches: list[int]
    reps: int
    eval_n: int
    steps: int | None = None
    notes: list[str] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    "full": Preset("full", ["demo", "tekken-h64", "tekken-h192", "tekken-h384"], list(PROMPT_KINDS), [128, 512],
                   [16, 32], [0.9, None], ["exclude_mask", "finish_last_step"], [1, 4, 16], reps=3, eval_n=50),
    "quick": Preset("quick", ["demo", "tekken-h64"], ["image"], [128], [32], [0.9, None],
                    ["exclude_mask", "finish_last_step"], [1, 4], reps=2, eval_n=10),
    "issue6": Preset("issue6", ["tekken-h64"], ["long"], [512], [32], [0.9], [], [1], reps=3, eval_n=0, steps=256),
}


def resolve_preset(args: Any) -> Preset:
    """The preset named by ``args`` with every list option the user gave substituted."""
    base = PRESETS["quick" if getattr(args, "quick", False) else args.preset]
    p = Preset(**{k: (list(v) if isinstance(v, list) else v) for k, v in vars(base).items()})
    for attr, arg in (("models", "models"), ("prompts", "prompts"), ("max_tokens", "max_tokens"),
                      ("block_lengths", "block_lengths"), ("thresholds", "thresholds"), ("policies", "policies"),
                      ("batches", "batches")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(p, attr, list(value))
    for attr in ("reps", "eval_n", "steps"):
        if getattr(args, attr, None) is not None:
            setattr(p, attr, getattr(args, attr))
    unknown = [m for m in p.models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    bad = [k for k in p.prompts if k not in PROMPT_KINDS]
    if bad:
        raise ValueError(f"unknown prompt kind(s) {bad}; known: {list(PROMPT_KINDS)}")
    if 1 not in p.batches:
        p.batches.insert(0, 1)
    if p.reps < 1:
        raise ValueError("reps must be >= 1")
    return p


def configs_for(preset: Preset, model: str) -> list[Config]:
    """Every configuration of ``model`` in ``preset``, in a stable order."""
    return [Config(model, pr, mt, bl, thr, endpoint_steps(mt, bl, preset.steps))
            for pr, mt, bl, thr in itertools.product(preset.prompts, preset.max_tokens, preset.block_lengths,
                                                      preset.thresholds)]
