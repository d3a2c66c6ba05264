"""Train the demo NLD-VLM on procedural scenes: ``python -m nemotron_fast.demo.train --out DIR --seed S --steps N``.

The model is :class:`nemotron_fast.model.NLDModel`, the inference code itself, built from a config dict. Two
stages, as a real VLM is built (the NLD-VLM's Pixtral tower comes pre-trained):

1. vision pre-training (``vision_pretrain_steps``): the vision tower and projector learn what each image token
   shows - a linear probe on every projected token classifies its grid cell (empty, or colour x shape) and, for a
   cell holding a shape, its left and right neighbours in left-to-right order (the 2-D RoPE of the vision tower
   sees horizontal offsets directly; the text backbone sees image tokens as one row-major sequence); the probe
   is thrown away;
2. the NLD joint objective, ``AR + 0.3 * diffusion``, on the text backbone and head with the vision tower and
   projector frozen (``freeze_vision``; trained end to end, the weak early gradient from the language side wipes
   the shape features out before the backbone learns to read them). See :mod:`nemotron_fast.demo.data`:

   - AR: cross-entropy of the clean stream's next-token logits on the answer tokens (EOS included);
   - diffusion: cross-entropy of the noisy block's logits at its masked positions, NOT shifted (logits[i]
     predicts token i), the block attending bidirectionally to itself and to the clean prefix before it.

Determinism: the initial weights come from ``torch.manual_seed(seed)``; example ``i`` of the run is scene
``train:<seed>:<i>``, and step ``s`` draws its block choice and mask pattern from a generator seeded with
``(seed, s)``. So a resumed run consumes exactly the data and noise of an uninterrupted one; the checkpoint
(``train_state.pt``, every ``--checkpoint-every`` steps and at the end) holds the model, the optimizer, the
step, the loss history and the global RNG state.

``DIR`` holds the checkpoint in the real layout (``config.json``, ``generation_config.json``,
``model.safetensors``, tokenizer files), refreshed at each checkpoint, plus
``train_state.pt`` and ``log.jsonl`` (one line of losses per step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import NLDConfig, load_config
from ..model import NLDModel
from .data import NUM_CELL_CLASSES, Batch, ExampleMaker, collate
from .scenes import IMAGE_SIZE

__all__ = ["TrainConfig", "SIZES", "train", "build_model", "write_checkpoint_files", "image_features_batched",
           "compute_loss", "main"]

# Model sizes. "demo" is the shipped model (1.4 M parameters, 0.5 M of them vision tower and projector; 5.6 MB
# in fp32); "tiny" is for tests.
SIZES: dict[str, dict[str, Any]] = {
    "demo": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vision_hidden_size=128, vision_intermediate_size=256,
                 vision_num_hidden_layers=2, vision_num_attention_heads=4, vision_image_size=IMAGE_SIZE),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, vision_hidden_size=16, vision_intermediate_size=32,
                 vision_num_hidden_layers=1, vision_num_attention_heads=2, vision_image_size=IMAGE_SIZE),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_STATE = "train_state.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; saved in the checkpoint so a resume continues the same run."""

    seed: int = 0
    steps: int = 20000
    size: str = "demo"
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_prob: float = 0.2
    diffusion_weight: float = 0.3
    vision_pretrain_steps: int = 5000
    freeze_vision: bool = True
    block_length: int = 32
    checkpoint_every: int = 1000
    size_overrides: dict[str, Any] = field(default_factory=dict)


def write_checkpoint_files(out: Path, size: dict[str, Any], tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Write the tokenizer (trained on the scene corpus, or copied from ``tokenizer_dir``), ``config.json``,
    and ``generation_config.json`` into ``out``; returns the config dict."""
    from ..testing.checkpoint import write_config_files
    from .tokenizer import read_token_ids, write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, out / name)
        ids = read_token_ids(out)
    else:
        ids = write_tokenizer(out)
    return write_config_files(out, ids, vlm=True, dtype="float32", **size)


def build_model(cfg: NLDConfig, seed: int) -> NLDModel:
    """A freshly initialised model: linears and embeddings N(0, 0.02), residual outputs scaled by
    1/sqrt(2 * layers) (GPT-2), norms at 1. Depends only on ``seed``."""
    torch.manual_seed(seed)
    model = NLDModel(cfg)
    n_layers = cfg.text.num_hidden_layers
    for name, p in model.named_parameters():
        if p.dim() < 2 or "patch_conv" in name:
            continue
        std = 0.02
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * n_layers)
        torch.nn.init.normal_(p, 0.0, std)
    return model


def image_features_batched(model: NLDModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """:meth:`NLDModel.image_features` for a batch of equal-sized images, with the batch as a tensor dimension.

    The model's own path packs all images into one sequence and attends image by image; this runs the same
    modules on ``[n, patches, hidden]``, one attention call for the whole batch.
    pixel_values float [n, 3, H, W] -> [n * merged, hidden].
    """
    tower = model.encoder.vision_tower
    n, _, h, w = pixel_values.shape
    x = tower.patch_conv(pixel_values.to(tower.patch_conv.weight.dtype))
    gh, gw = x.shape[-2:]
    x = tower.ln_pre(x.flatten(2).transpose(1, 2))
    hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    half = torch.cat([hh.reshape(-1, 1).float() * tower.inv_freq_h, ww.reshape(-1, 1).float() * tower.inv_freq_w],
                     dim=-1)
    emb = torch.cat([half, half], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    for layer in tower.transformer.layers[: tower.num_layers_run]:
        x = layer(x, cos, sin, [gh * gw])
    sizes = torch.tensor([[h, w]] * n, dtype=torch.long)
    return model.encoder.multi_modal_projector(x.reshape(n * gh * gw, -1), sizes)


def compute_loss(model: NLDModel, batch: Batch, diffusion_weight: float, *, train_vision: bool = True
                 ) -> tuple[torch.Tensor, float, float]:
    """Joint loss ``AR + diffusion_weight * diffusion`` -> (loss, ar value, diffusion value).

    ``train_vision=False`` runs the vision tower and projector without autograd (they stay frozen)."""
    with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
        feats = image_features_batched(model, batch.pixel_values)
    embeds = model.embed(batch.input_ids, image_features=feats)
    hidden = model.forward_hidden(embeds, attn_mask=batch.attn_mask, positions=batch.positions)
    ar_pos = batch.ar_targets != -100
    diff_pos = batch.diff_targets != -100
    ar = F.cross_entropy(model.head(hidden[ar_pos]).float(), batch.ar_targets[ar_pos])
    diff = F.cross_entropy(model.head(hidden[diff_pos]).float(), batch.diff_targets[diff_pos])
    return ar + diffusion_weight * diff, float(ar.detach()), float(diff.detach())


def vision_pretrain_loss(model: NLDModel, probe: torch.nn.Linear, batch: Batch) -> torch.Tensor:
    """Stage 1: cross-entropy of a linear probe on every projected image token against its cell's content and,
    for tokens holding a shape, the shapes next to it in left-to-right order (summed over the three targets)."""
    feats = image_features_batched(model, batch.pixel_values)
    logits = probe(feats).float().view(-1, 3, NUM_CELL_CLASSES)
    return sum(F.cross_entropy(logits[:, j], batch.cell_labels[:, j]) for j in range(3))


def _lr_at(tc: TrainConfig, step: int) -> float:
    """Stage 1 (vision pre-training): linear warm-up then constant. Stage 2: warm-up again, cosine to the end."""
    k = tc.vision_pretrain_steps
    if step < k:
        return tc.lr * min(1.0, (step + 1) / max(1, min(tc.warmup_steps, k)))
    step -= k
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = (step - tc.warmup_steps) / max(1, tc.steps - k - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _optimizer(model: NLDModel, probe: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed_tokens" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0},
                              {"params": list(probe.parameters()), "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))


def _save_weights(model: NLDModel, out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")


def _save_state(out: Path, model: NLDModel, probe: torch.nn.Module, opt: torch.optim.Optimizer, tc: TrainConfig,
                step: int, history: list[dict[str, float]]) -> None:
    state = {"step": step, "model": model.state_dict(), "probe": probe.state_dict(), "optimizer": opt.state_dict(),
             "config": asdict(tc), "history": history, "rng": torch.get_rng_state()}
    tmp = out / (_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / _STATE)
    _save_weights(model, out)


def train(out: str | Path, tc: TrainConfig, *, resume: bool = False, stop_at: int | None = None,
          tokenizer_dir: str | Path | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Run (or resume) training into ``out``; returns the loss history (one dict per step since step 0).

    ``stop_at`` ends this invocation after that many total steps (as an interruption would, with a checkpoint),
    without changing the run's schedule. ``tokenizer_dir`` reuses existing tokenizer files instead of training
    the BPE (tests).
    """
    from tqdm.auto import tqdm

    from ..processing import Processor

    out = Path(out)
    state = None
    if resume and (out / _STATE).is_file():
        state = torch.load(out / _STATE, weights_only=False)
        saved = TrainConfig(**state["config"])
        if saved != tc:
            diffs = {k: (v, getattr(tc, k)) for k, v in asdict(saved).items() if getattr(tc, k) != v}
            raise ValueError(f"--resume with a different configuration than the checkpoint's: {diffs} "
                             "(checkpoint value, requested value)")
    elif not resume or not (out / "config.json").is_file():
        size = dict(SIZES[tc.size], **tc.size_overrides)
        write_checkpoint_files(out, size, Path(tokenizer_dir) if tokenizer_dir is not None else None)
    cfg = load_config(out)
    maker = ExampleMaker(Processor.from_pretrained(out, cfg), tc.caption_prob)
    model = build_model(cfg, tc.seed)
    # the stage-1 probe lives only in train_state.pt; the shipped checkpoint is the plain model
    probe = torch.nn.Linear(cfg.text.hidden_size, 3 * NUM_CELL_CLASSES, bias=False)
    opt = _optimizer(model, probe, tc)
    history: list[dict[str, float]] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history, start = state["history"], state["step"]
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    model.train()
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    log = (out / "log.jsonl").open("a")
    try:
        for step in range(start, end):
            t0, c0 = time.perf_counter(), time.process_time()
            examples = [maker(tc.seed, step * tc.batch_size + j) for j in range(tc.batch_size)]
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            batch = collate(examples, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=pad_id,
                            block_length=tc.block_length, generator=gen)
            lr = _lr_at(tc, step)
            for g in opt.param_groups:
                g["lr"] = lr
            rec: dict[str, Any] = {"step": step}
            if step < tc.vision_pretrain_steps:
                loss = vision_pretrain_loss(model, probe, batch)
                rec.update(stage="vision", vision=loss.item())
                ar = diff = float("nan")
            else:
                loss, ar, diff = compute_loss(model, batch, tc.diffusion_weight, train_vision=not tc.freeze_vision)
                rec.update(stage="nld", ar=ar, diff=diff)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            opt.step()
            rec.update(loss=loss.item(), lr=lr, grad_norm=gnorm, sec=time.perf_counter() - t0,
                       cpu_sec=time.process_time() - c0)
            history.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.3f}", ar=f"{ar:.3f}", diff=f"{diff:.3f}")
            if (step + 1) % tc.checkpoint_every == 0 and step + 1 < end:
                log.flush()
                _save_state(out, model, probe, opt, tc, step + 1, history)
        _save_state(out, model, probe, opt, tc, end, history)
    finally:
        log.close()
        bar.close()
    return history


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m nemotron_fast.demo.train --help``)."""
    ap = argparse.ArgumentParser(prog="python -m nemotron_fast.demo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="run directory (checkpoint layout + train_state.pt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    ap.add_argument("--vision-pretrain-steps", type=int, default=TrainConfig.vision_pretrain_steps)
    ap.add_argument("--caption-prob", type=float, default=TrainConfig.caption_prob,
                    help="share of examples that are descriptions (the rest are questions)")
    ap.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt when present")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this many total steps (resumable)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    tc = TrainConfig(seed=a.seed, steps=a.steps, size=a.size, batch_size=a.batch_size, lr=a.lr,
                     checkpoint_every=a.checkpoint_every, vision_pretrain_steps=a.vision_pretrain_steps,
                     caption_prob=a.caption_prob)
    t0 = time.perf_counter()
    hist = train(a.out, tc, resume=a.resume, stop_at=a.stop_at, progress=not a.no_progress)
    last = hist[-1] if hist else {}
    print(json.dumps({"out": str(a.out), "steps": len(hist), "wall_s": round(time.perf_counter() - t0, 1),
                      "loss": last.get("loss"), "ar": last.get("ar"), "diff": last.get("diff")}))


if __name__ == "__main__":
    main()
