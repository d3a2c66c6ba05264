"""The linear_spec draft adapter: a PEFT LoRA in the checkpoint's ``linear_spec_lora/`` folder.

Upstream ships it as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's own layout: keys
``base_model.model.encoder.layers.<i>.self_attn.<proj>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]``; on the real checkpoints ``o_proj`` only, r 128, alpha 512). It is ON for the draft forwards of
linear self-speculation only, OFF for the prefill and the verify, so it can change what is drafted but never
what is emitted.

This module only reads the files. Our model applies the adapter as a low-rank delta inside the attention
(:class:`~nemotron_fast.model.layers.Attention`); the reference twin applies it independently, PEFT-style, with
forward hooks (:meth:`nemotron_fast.hf_twin.TwinModel.draft_adapter`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["DraftLoRA", "load_draft_lora", "LORA_DIR", "lora_delta"]

#: Subfolder of a checkpoint that holds the draft adapter.
LORA_DIR = "linear_spec_lora"
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class DraftLoRA:
    """Low-rank deltas per decoder layer and projection: ``weights[(layer, proj)] = (A [r, in], B [out, r])``,
    applied as ``y + scale * (x @ A.T) @ B.T`` (``scale = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    rank: int
    path: str | None = None

    def layer(self, i: int, proj: str = "o_proj") -> tuple[torch.Tensor, torch.Tensor, float] | None:
        ab = self.weights.get((i, proj))
        return None if ab is None else (ab[0], ab[1], self.scale)

    @property
    def projections(self) -> set[str]:
        return {p for _, p in self.weights}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DraftLoRA:
        """A copy on ``device``; ``dtype`` None keeps float32 (PEFT upcasts bf16/fp16 adapter weights to fp32)."""
        dt = dtype or torch.float32
        moved = {k: (a.to(device, dt), b.to(device, dt)) for k, (a, b) in self.weights.items()}
        return DraftLoRA(moved, self.scale, self.rank, self.path)


def lora_delta(x: torch.Tensor, y: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    """``y + scale * B(A(x))`` as PEFT's ``lora.Linear`` computes it: the delta in the adapter dtype (fp32), added
    to the base output promoted to that dtype, then rounded back to ``y``'s dtype."""
    a, b, scale = lora
    delta = (x.to(a.dtype) @ a.T) @ b.T * scale
    return (y.to(delta.dtype) + delta).to(y.dtype)


def load_draft_lora(path: str | Path, num_layers: int, hidden_sizes: dict[str, tuple[int, int]] | None = None
                    ) -> DraftLoRA | None:
    """Read the adapter in ``path`` (a checkpoint directory holding ``linear_spec_lora/``, or that folder itself).

    Returns ``None`` when there is no adapter. ``hidden_sizes`` maps a projection name to its (out, in) sizes,
    checked against the adapter's shapes. Raises :class:`CheckpointError` naming what is wrong with a
    malformed adapter (unknown PEFT type, missing A/B pair, layer out of range, shape mismatch, DoRA, bias).
    """
    from safetensors.torch import load_file

    root = Path(path)
    folder = root if (root / "adapter_config.json").is_file() else root / LORA_DIR
    cfg_file, weight_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file():
        return None
    if not weight_file.is_file():
        raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    cfg = json.loads(cfg_file.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_file}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file}: adapter biases ({cfg.get('bias')!r}) are not supported")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(weight_file)).items():
        m = _KEY.search(key)
        if m is None:
            raise CheckpointError(f"{weight_file}: unexpected tensor {key!r} (expected ...layers.<i>.self_attn."
                                  "<proj>.lora_A/B.weight)")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        if not 0 <= layer < num_layers:
            raise CheckpointError(f"{weight_file}: {key!r} names layer {layer}, the model has {num_layers}")
        pairs.setdefault((layer, proj), {})[ab] = t.float()
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, proj), d in sorted(pairs.items()):
        if set(d) != {"A", "B"}:
            raise CheckpointError(f"{weight_file}: layer {layer} {proj} has lora_{'A' if 'A' not in d else 'B'} "
                                  "missing")
        a, b = d["A"], d["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise CheckpointError(f"{weight_file}: layer {layer} {proj}: lora_A {tuple(a.shape)} and lora_B "
                                  f"{tuple(b.shape)} do not have rank r = {rank}")
        if hidden_sizes is not None and proj in hidden_sizes and (b.shape[0], a.shape[1]) != hidden_sizes[proj]:
            raise CheckpointError(f"{weight_file}: layer {layer} {proj} maps {a.shape[1]} -> {b.shape[0]}, the model's "
                                  f"{proj} maps {hidden_sizes[proj][1]} -> {hidden_sizes[proj][0]}")
        weights[(layer, proj)] = (a, b)
    if not weights:
        raise CheckpointError(f"{weight_file} holds no LoRA tensors")
    return DraftLoRA(weights, scale, rank, str(folder))
