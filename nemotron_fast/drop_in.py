"""Drop-in acceleration of an upstream model object: ``patch(model)`` swaps its ``generate`` for the fast
sampler, reusing the object's own weight tensors (no copy); ``unpatch(model)`` restores the original.

The object needs the upstream module layout (``encoder.embed_tokens``, ``encoder.layers``, ``encoder.norm``,
for the VLM ``encoder.vision_tower`` and ``encoder.multi_modal_projector``, and ``diffusion_head``) and a
``config`` (a transformers config with ``to_dict()``, a plain dict, or an :class:`NLDConfig`). The real VLM
config holds no image-marker ids, so the id of ``<|image_pad|>`` (where vision features go) is read, in this
order, from ``tokenizer=`` (a transformers tokenizer), the tokenizer files in the object's ``name_or_path``
directory, or the object's own ``IMAGE_TOKEN_ID`` (upstream's class constant).
``ar_generate`` and ``linear_spec_generate`` are replaced too, with upstream's signatures and returns
(``(prompt + generated ids, nfe)``; see :func:`_fast_ar` and :func:`_fast_linear_spec`). The draft adapter for
``linear_spec_generate`` is taken from PEFT LoRA layers attached to the object (``PeftModel(...).model``, as
upstream's README loads it) or else from ``linear_spec_lora/`` in the object's ``name_or_path`` directory. Unlike
upstream, the patched methods leave the object's attention layers as they found them (upstream's methods leave
every layer in AR mode afterwards); nothing of ours reads that flag.
Both upstream call shapes are accepted: the VLM's ``generate(input_ids, pixel_values=..., image_sizes=...,
max_new_tokens=..., steps=..., block_length=..., threshold=..., shift_logits=False, eos_token_id=...)`` and the
text LM's ``generate(prompt_ids, max_new_tokens, block_length, threshold=None, causal_context=True,
temperature=0.0, eos_token_id=None, ...)`` (no ``steps``: block_length steps per block). Like upstream's
``generate_with_prefix_cache_block_diff``, the result is ``(prompt + completion ids [B, P + T], nfe)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import NLDConfig, read_added_tokens
from .model import NLDModel
from .model.lora import DraftLoRA

__all__ = ["patch", "unpatch", "is_patched"]

_ATTR = "_nemotron_fast"


def _added_tokens(model: Any, tokenizer: Any) -> dict[str, int]:
    """Token string -> id of the added tokens the upstream object comes with (see the module docstring)."""
    tokens: dict[str, int] = {}
    if tokenizer is not None:
        tokens.update({str(k): int(v) for k, v in tokenizer.get_added_vocab().items()})
    else:
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if isinstance(path, (str, Path)) and Path(path).is_dir():
            tokens.update(read_added_tokens(path) or {})
    own = getattr(model, "IMAGE_TOKEN_ID", None)
    if "<|image_pad|>" not in tokens and isinstance(own, int):
        tokens["<|image_pad|>"] = own
    return tokens


def _config_of(model: Any, tokenizer: Any = None) -> NLDConfig:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, NLDConfig):
        return cfg
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, dict):
        raise TypeError("patch() needs a model with a `config` (transformers config, dict or NLDConfig)")
    gen = getattr(model, "generation_config", None)
    return NLDConfig.from_dict(cfg, generation=gen.to_dict() if hasattr(gen, "to_dict") else None,
                               tokens=_added_tokens(model, tokenizer))


def _peft_lora(model: Any, num_layers: int) -> DraftLoRA | None:
    """The draft adapter from PEFT ``LoraLayer`` modules attached to ``model`` (they hold ``lora_A``/``lora_B``
    ModuleDicts and a ``scaling`` dict per adapter name), or None when there are none."""
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: set[float] = set()
    rank = 0
    for name, module in model.named_modules():
        lora_a, lora_b, scaling = (getattr(module, a, None) for a in ("lora_A", "lora_B", "scaling"))
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(scaling, dict) or not len(lora_a):
            continue
        parts = name.split(".")
        if "layers" not in parts or parts[-2] != "self_attn":
            raise TypeError(f"patch(): a LoRA adapter on {name!r} is not a supported draft adapter (attention "
                            "projections only)")
        adapter = next(iter(lora_a.keys()))
        a, b = lora_a[adapter].weight.detach().float(), lora_b[adapter].weight.detach().float()
        weights[(int(parts[parts.index("layers") + 1]), parts[-1])] = (a, b)
        scales.add(float(scaling[adapter]))
        rank = a.shape[0]
    if not weights:
        return None
    if len(scales) != 1 or any(i >= num_layers for i, _ in weights):
        raise TypeError(f"patch(): the attached LoRA layers disagree on their scale ({sorted(scales)}) or name "
                        "layers the model does not have")
    return DraftLoRA(weights, scales.pop(), rank)


def _shadow_model(model: Any, cfg: NLDConfig) -> NLDModel:
    """Our model whose parameters ARE the upstream object's tensors (shared storage); PEFT wrappers are seen
    through (``<proj>.base_layer.weight`` is the base weight, the LoRA factors become :attr:`draft_lora`)."""
    with torch.device("meta"):
        ours = NLDModel(cfg)
    theirs = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
              if not k.endswith("inv_freq") and ".lora_" not in k}
    expected = set(ours.state_dict())
    missing, unexpected = sorted(expected - set(theirs)), sorted(set(theirs) - expected)
    if missing or unexpected:
        raise TypeError(f"the model's weights do not match its config: missing {missing[:8]}, "
                        f"unexpected {unexpected[:8]}")
    ours.load_state_dict({k: theirs[k] for k in expected}, strict=True, assign=True)
    device = ours.diffusion_head.weight.device
    ours.reset_buffers(device)
    ours.checkpoint_path = getattr(model, "name_or_path", None) or getattr(model, "checkpoint_path", None)
    lora = _peft_lora(model, cfg.text.num_hidden_layers)
    if lora is None and ours.checkpoint_path and Path(ours.checkpoint_path).is_dir():
        from .model.nld import load_model_lora

        lora = load_model_lora(ours, ours.checkpoint_path)
    ours.draft_lora = None if lora is None else lora.to(device)
    return ours.eval()


def _with_prompt(prompt: torch.Tensor, rows: list[list[int]], fill: int) -> torch.Tensor:
    """prompt [B, P] + completions (right-filled with ``fill`` to the longest) -> [B, P + T] on prompt's device."""
    width = max(len(r) for r in rows)
    comp = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        comp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.cat([prompt.to("cpu", torch.long), comp], 1).to(prompt.device)


def _no_thinking_budget(kw: dict[str, Any]) -> None:
    if kw.pop("max_thinking_tokens", None) is not None or kw.pop("end_think_token_id", None) is not None:
        raise NotImplementedError("the thinking budget (max_thinking_tokens / end_think_token_id) is not "
                                  "accelerated; call unpatch() first")


def _fast_ar(ours: NLDModel, original: Any):
    """Upstream's ``ar_generate(prompt_ids, max_new_tokens=128, temperature=0.0, eos_token_id=None, ...)`` ->
    ``(prompt + generated [B, P + T], nfe)``: every row gets every generated token (batch-coupled EOS stop).
    Extensions: ``pixel_values``, ``image_sizes`` (VLM) and ``seed`` (noise at T > 0)."""
    from .generate import generate

    def ar_generate(prompt_ids: torch.Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                    eos_token_id: int | None = None, **kw: Any) -> tuple[torch.Tensor, int]:
        _no_thinking_budget(kw)
        pix, sizes, seed = kw.pop("pixel_values", None), kw.pop("image_sizes", None), kw.pop("seed", None)
        if kw:
            raise TypeError(f"unexpected ar_generate() arguments: {sorted(kw)}")
        result = generate(ours, prompt_ids, pix, sizes, max_new_tokens=int(max_new_tokens), mode="ar",
                          temperature=float(temperature), eos_token_id=eos_token_id, seed=seed)
        return _with_prompt(prompt_ids, result.completion_ids, ours.config.mask_token_id), result.nfe

    ar_generate.__wrapped__ = original  # type: ignore[attr-defined]
    return ar_generate


def _fast_linear_spec(ours: NLDModel, original: Any):
    """Upstream's ``linear_spec_generate(prompt_ids, max_new_tokens=128, block_length=32, temperature=0.0,
    mask_token_id=None, eos_token_id=None, ..., threshold=0.0)`` -> ``(prompt + generated [1, P + T], nfe)``,
    batch 1 as upstream (ValueError otherwise), the overshoot past ``max_new_tokens`` included. Extensions:
    ``pixel_values``, ``image_sizes`` and ``seed``."""
    from .generate import generate

    def linear_spec_generate(prompt_ids: torch.Tensor, max_new_tokens: int = 128, block_length: int = 32,
                             temperature: float = 0.0, mask_token_id: int | None = None,
                             eos_token_id: int | None = None, **kw: Any) -> tuple[torch.Tensor, int]:
        threshold = kw.pop("threshold", 0.0)
        _no_thinking_budget(kw)
        pix, sizes, seed = kw.pop("pixel_values", None), kw.pop("image_sizes", None), kw.pop("seed", None)
        if kw:
            raise TypeError(f"unexpected linear_spec_generate() arguments: {sorted(kw)}")
        if prompt_ids.shape[0] != 1:
            raise ValueError("Linear speculative decoding requires batch_size == 1")
        if mask_token_id is not None and mask_token_id != ours.config.mask_token_id:
            raise NotImplementedError(f"mask_token_id {mask_token_id} differs from the config's "
                                      f"{ours.config.mask_token_id}; call unpatch() first")
        result = generate(ours, prompt_ids, pix, sizes, max_new_tokens=int(max_new_tokens), mode="linear_spec",
                          block_length=int(block_length), threshold=float(threshold or 0.0),
                          temperature=float(temperature), eos_token_id=eos_token_id, seed=seed)
        return _with_prompt(prompt_ids, result.completion_ids, ours.config.mask_token_id), result.nfe

    linear_spec_generate.__wrapped__ = original  # type: ignore[attr-defined]
    return linear_spec_generate


def _fast_generate(ours: NLDModel, original: Any, return_nfe: bool):
    from .generate import generate

    def generate_patched(input_ids: torch.Tensor | None = None, *args: Any, **kw: Any) -> Any:
        prompt = kw.pop("prompt_ids", None) if input_ids is None else input_ids
        if prompt is None:
            raise TypeError("generate() needs input_ids (VLM call shape) or prompt_ids (text call shape)")
        pixel_values, image_sizes = kw.pop("pixel_values", None), kw.pop("image_sizes", None)
        positional = ("max_new_tokens", "block_length", "threshold")
        for name, value in zip(positional, args):
            kw.setdefault(name, value)
        if kw.pop("shift_logits", False):
            raise NotImplementedError("shift_logits=True (dream-style) is not accelerated; call unpatch() first")
        if not kw.pop("causal_context", True):
            raise NotImplementedError("causal_context=False is not accelerated; call unpatch() first")
        max_new = kw.pop("max_new_tokens", None)
        if max_new is None:
            max_new = kw.pop("gen_length", None)
        if max_new is None:
            raise TypeError("generate() needs max_new_tokens")
        call = dict(steps=kw.pop("steps", None), block_length=int(kw.pop("block_length", ours.config.block_size)),
                    threshold=kw.pop("threshold", None), temperature=float(kw.pop("temperature", 0.0)),
                    eos_token_id=kw.pop("eos_token_id", None), seed=kw.pop("seed", None))
        kw.pop("mask_id", None)
        for ignored in ("remasking", "factor", "neg_entropy", "max_thinking_tokens", "end_think_token_id"):
            if kw.pop(ignored, None) not in (None, "low_confidence"):
                raise NotImplementedError(f"{ignored} is not supported by the fast sampler; call unpatch() first")
        if kw:
            raise TypeError(f"unexpected generate() arguments: {sorted(kw)}")
        result = generate(ours, prompt, pixel_values, image_sizes, max_new_tokens=int(max_new), **call)
        out = _with_prompt(prompt, result.completion_ids, ours.config.mask_token_id)
        return (out, result.nfe) if return_nfe else out

    generate_patched.__wrapped__ = original  # type: ignore[attr-defined]
    return generate_patched


_METHODS = ("generate", "ar_generate", "linear_spec_generate")


def patch(model: Any, *, return_nfe: bool = True, tokenizer: Any = None) -> Any:
    """Replace ``model.generate``, ``model.ar_generate`` and ``model.linear_spec_generate`` by the fast paths
    (same tokens and NFE as upstream). Returns ``model``.

    ``tokenizer`` (optional) is the checkpoint's transformers tokenizer, used to resolve the image markers by
    name when the object's ``name_or_path`` is not a local checkpoint directory."""
    if is_patched(model):
        return model
    if not hasattr(model, "encoder") or not hasattr(model, "diffusion_head"):
        raise TypeError("patch() needs the upstream module layout: `encoder.*` and `diffusion_head`")
    cfg = _config_of(model, tokenizer)
    ours = _shadow_model(model, cfg)
    saved = {name: (name in vars(model), getattr(model, name, None)) for name in _METHODS}
    object.__setattr__(model, _ATTR, {"model": ours, "saved": saved})
    object.__setattr__(model, "generate", _fast_generate(ours, saved["generate"][1], return_nfe))
    object.__setattr__(model, "ar_generate", _fast_ar(ours, saved["ar_generate"][1]))
    object.__setattr__(model, "linear_spec_generate", _fast_linear_spec(ours, saved["linear_spec_generate"][1]))
    return model


def unpatch(model: Any) -> Any:
    """Restore the methods that :func:`patch` replaced. Returns ``model``."""
    state = vars(model).get(_ATTR)
    if state is None:
        return model
    for name, (had_own, original) in state["saved"].items():
        if had_own:
            object.__setattr__(model, name, original)
        else:
            object.__delattr__(model, name)
    object.__delattr__(model, _ATTR)
    return model


def is_patched(model: Any) -> bool:
    return _ATTR in vars(model)
