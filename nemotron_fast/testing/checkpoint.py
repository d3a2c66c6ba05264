"""Write tiny Nemotron-Labs-Diffusion checkpoints in the real repository layout.

The files are the ones the real repo has: ``config.json``, ``generation_config.json``, ``model.safetensors``
(or sharded with ``model.safetensors.index.json``) and tokenizer files in the NLD layout (ChatML, think tags,
image markers at 18-21, the VLM's ``|<MASK>|`` after the vocabulary; see
:mod:`nemotron_fast.testing.tokenizer_files`). Like the real VLM repo there is no ``preprocessor_config.json``
and ``config.json`` holds no image-marker ids. Key names follow the upstream module layout (``encoder.*``,
``diffusion_head``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["write_tiny_checkpoint", "tiny_config_dict", "write_config_files", "write_draft_lora"]

_TEXT_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=262144,
    block_size=32,
)
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
    image_size=224,
)
_ROPE_DEFAULTS: dict[str, Any] = dict(
    rope_type="yarn",
    rope_theta=1000000.0,
    factor=16.0,
    original_max_position_embeddings=16384,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
    llama_4_scaling_beta=0.1,
)


def tiny_config_dict(token_ids: dict[str, int], *, vlm: bool = True, dtype: str = "float32",
                     **size_overrides: Any) -> dict[str, Any]:
    """The ``config.json`` content of a tiny checkpoint.

    ``token_ids`` holds ``vocab_size`` and the special ids bos/eos/pad/mask (image markers are not config fields).
    ``size_overrides`` may set any text field (``hidden_size``...), ``vision_<field>`` for the vision tower,
    or ``rope_<field>`` for RoPE parameters.
    """
    text = dict(_TEXT_DEFAULTS)
    vision = dict(_VISION_DEFAULTS)
    rope = dict(_ROPE_DEFAULTS)
    for k, v in size_overrides.items():
        if k.startswith("vision_"):
            if k[7:] not in vision:
                raise TypeError(f"unknown vision override {k!r} (known: {sorted('vision_' + x for x in vision)})")
            vision[k[7:]] = v
        elif k.startswith("rope_") and k != "rope_theta" or k == "rope_theta":
            key = k if k in ("rope_type", "rope_theta") else k[5:]
            if key not in rope:
                raise TypeError(f"unknown rope override {k!r}")
            rope[key] = v
        elif k in text:
            text[k] = v
        else:
            raise TypeError(f"unknown size override {k!r} (known: {sorted(text)} + vision_* + rope_*)")
    if rope["rope_type"] == "default":
        rope = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    cfg: dict[str, Any] = {
        "architectures": ["NemotronLabsDiffusionVLMModel" if vlm else "NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion_vlm" if vlm else "nemotron_labs_diffusion",
        "vocab_size": token_ids["vocab_size"],
        **{k: v for k, v in text.items()},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "rope_parameters": rope,
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
        "mask_token_id": token_ids["mask_token_id"],
        "dlm_paradigm": "bidirectional",
        "dtype": dtype,
    }
    if vlm:
        vision["head_dim"] = vision["hidden_size"] // vision["num_attention_heads"]
        cfg.update(
            spatial_merge_size=2,
            projector_hidden_act="gelu",
            multimodal_projector_bias=False,
            vision_feature_layer=-1,
            vision_config={
                "model_type": "pixtral",
                **vision,
                "num_channels": 3,
                "hidden_act": "silu",
                "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
            },
        )
    return cfg


def _init_weights(cfg: dict[str, Any], gen: torch.Generator, head_scale: float) -> dict[str, torch.Tensor]:
    """Random weights with the real key names. Norm weights are perturbed around 1 so a skipped norm shows."""

    def lin(out: int, inp: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    w: dict[str, torch.Tensor] = {"encoder.embed_tokens.weight": torch.randn(vocab, h, generator=gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(nq * hd, h, 0.1)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h, 0.1)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h, 0.1)
        w[p + "self_attn.o_proj.weight"] = lin(h, nq * hd, 0.1)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h, 0.1)
        w[p + "mlp.up_proj.weight"] = lin(inter, h, 0.1)
        w[p + "mlp.down_proj.weight"] = lin(h, inter, 0.1)
    w["encoder.norm.weight"] = norm(h)
    w["diffusion_head.weight"] = lin(vocab, h, head_scale / h**0.5)
    if "vision_config" in cfg:
        v = cfg["vision_config"]
        vh, vi, p_ = v["hidden_size"], v["intermediate_size"], v["patch_size"]
        w["encoder.vision_tower.patch_conv.weight"] = torch.randn(vh, 3, p_, p_, generator=gen) * 0.05
        w["encoder.vision_tower.ln_pre.weight"] = norm(vh)
        for i in range(v["num_hidden_layers"]):
            p = f"encoder.vision_tower.transformer.layers.{i}."
            w[p + "attention_norm.weight"] = norm(vh)
            w[p + "ffn_norm.weight"] = norm(vh)
            for proj in ("q", "k", "v", "o"):
                w[p + f"attention.{proj}_proj.weight"] = lin(vh, vh, 0.1)
            w[p + "feed_forward.gate_proj.weight"] = lin(vi, vh, 0.1)
            w[p + "feed_forward.up_proj.weight"] = lin(vi, vh, 0.1)
            w[p + "feed_forward.down_proj.weight"] = lin(vh, vi, 0.1)
        m = cfg["spatial_merge_size"]
        w["encoder.multi_modal_projector.norm.weight"] = norm(vh)
        w["encoder.multi_modal_projector.patch_merger.merging_layer.weight"] = lin(vh, vh * m * m, 0.05)
        w["encoder.multi_modal_projector.linear_1.weight"] = lin(h, vh, 0.1)
        w["encoder.multi_modal_projector.linear_2.weight"] = lin(h, h, 0.1)
    return w


def _save_weights(weights: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, shards: int) -> None:
    from safetensors.torch import save_file

    tensors = {k: t.to(dtype).contiguous() for k, t in weights.items()}
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        part = keys[s * per:(s + 1) * per]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(out / name), metadata=meta)
        for k in part:
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_config_files(out: Path, token_ids: dict[str, int], *, vlm: bool, dtype: str,
                       **size_overrides: Any) -> dict[str, Any]:
    """Write ``config.json`` and ``generation_config.json`` for the token ids of a tokenizer already in ``out``;
    returns the config dict (see :func:`tiny_config_dict`)."""
    cfg = tiny_config_dict(token_ids, vlm=vlm, dtype=dtype, **size_overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return cfg


def write_tiny_checkpoint(
    path: str | Path,
    *,
    vlm: bool = True,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    vocab: Literal["small", "tekken"] = "small",
    shards: int = 1,
    head_scale: float = 1.0,
    draft_lora_rank: int = 0,
    draft_lora_std: float = 0.1,
    **size_overrides: Any,
) -> Path:
    """Write a tiny NLD (VLM when ``vlm``) checkpoint with random weights to ``path`` and return the path.

    ``dtype`` is the stored weight dtype (also written as ``config.json``'s ``dtype``). ``vocab="tekken"`` uses
    the real 131072-token Tekken tokenizer shipped in ``mistral-common``. ``head_scale`` multiplies the
    diffusion head's init (larger = peakier, more confident predictions). ``shards > 1`` writes a sharded
    checkpoint with an index. ``draft_lora_rank > 0`` also writes a random linear_spec draft adapter of that rank
    in ``linear_spec_lora/`` (see :func:`write_draft_lora`). ``size_overrides`` are passed to
    :func:`tiny_config_dict`.
    """
    from .tokenizer_files import write_tokenizer_files

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer_files(out, vocab=vocab, vlm=vlm)
    cfg = write_config_files(out, token_ids, vlm=vlm, dtype=str(dtype).removeprefix("torch."), **size_overrides)
    gen = torch.Generator().manual_seed(seed)
    _save_weights(_init_weights(cfg, gen, head_scale), out, dtype, shards)
    if draft_lora_rank:
        write_draft_lora(out, cfg, rank=draft_lora_rank, seed=seed + 7919, std=draft_lora_std, dtype=dtype)
    return out


def write_draft_lora(out: str | Path, cfg: dict[str, Any], *, rank: int, seed: int = 0, std: float = 0.1,
                     alpha: float | None = None, target_modules: tuple[str, ...] = ("o_proj",),
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a random draft adapter in PEFT's saved layout to ``out/linear_spec_lora/``: ``adapter_config.json``
    (the fields PEFT writes; ``lora_alpha`` defaults to ``4 * rank``, upstream's alpha/r = 512/128) and
    ``adapter_model.safetensors`` with keys ``base_model.model.encoder.layers.<i>.self_attn.<proj>.lora_A.weight``
    ``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` (PEFT drops the adapter name when saving). Both factors are
    random (PEFT initialises B to zero; a trained adapter has neither zero). ``cfg`` is the config dict."""
    from safetensors.torch import save_file

    folder = Path(out) / "linear_spec_lora"
    folder.mkdir(parents=True, exist_ok=True)
    alpha = 4.0 * rank if alpha is None else alpha
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    sizes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        for proj in target_modules:
            o, n = sizes[proj]
            key = f"base_model.model.encoder.layers.{i}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n, generator=gen) * std).to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(o, rank, generator=gen) * std).to(dtype).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": str(Path(out).name),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": 0.0,
        "modules_to_save": None, "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None,
        "target_modules": list(target_modules), "task_type": None, "use_dora": False, "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
