"""Drop-in acceleration of an upstream model object: ``patch(model)`` swaps its ``generate`` for the fast
sampler, reusing the object's own weight tensors (no copy); ``unpatch(model)`` restores the original.

The object needs the upstream module layout (``encoder.embed_tokens``, ``encoder.layers``, ``encoder.norm``,
for the VLM ``encoder.vision_tower`` and ``encoder.multi_modal_projector``, and ``diffusion_head``) and a
``config`` (a transformers config with ``to_dict()``, a plain dict, or an :class:`NLDConfig`). The real VLM
config holds no image-marker ids, so the id of ``<|image_pad|>`` (where vision features go) is read, in this
order, from ``tokenizer=`` (a transformers tokenizer), the tokenizer files in the object's ``name_or_path``
directory, or the object's own ``IMAGE_TOKEN_ID`` (upstream's class constant).
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


def _shadow_model(model: Any, cfg: NLDConfig) -> NLDModel:
    """Our model whose parameters ARE the upstream object's tensors (shared storage)."""
    with torch.device("meta"):
        ours = NLDModel(cfg)
    theirs = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    expected = set(ours.state_dict())
    missing, unexpected = sorted(expected - set(theirs)), sorted(set(theirs) - expected)
    if missing or unexpected:
        raise TypeError(f"the model's weights do not match its config: missing {missing[:8]}, "
                        f"unexpected {unexpected[:8]}")
    ours.load_state_dict({k: theirs[k] for k in expected}, strict=True, assign=True)
    device = ours.diffusion_head.weight.device
    ours.reset_buffers(device)
    ours.checkpoint_path = getattr(model, "name_or_path", None) or getattr(model, "checkpoint_path", None)
    return ours.eval()


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
        rows = result.completion_ids
        width = max(len(r) for r in rows)
        comp = torch.full((len(rows), width), ours.config.mask_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            comp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        out = torch.cat([prompt.to("cpu", torch.long), comp], 1).to(prompt.device)
        return (out, result.nfe) if return_nfe else out

    generate_patched.__wrapped__ = original  # type: ignore[attr-defined]
    return generate_patched


def patch(model: Any, *, return_nfe: bool = True, tokenizer: Any = None) -> Any:
    """Replace ``model.generate`` by the fast sampler (same tokens and NFE as upstream). Returns ``model``.

    ``tokenizer`` (optional) is the checkpoint's transformers tokenizer, used to resolve the image markers by
    name when the object's ``name_or_path`` is not a local checkpoint directory."""
    if is_patched(model):
        return model
    if not hasattr(model, "encoder") or not hasattr(model, "diffusion_head"):
        raise TypeError("patch() needs the upstream module layout: `encoder.*` and `diffusion_head`")
    cfg = _config_of(model, tokenizer)
    ours = _shadow_model(model, cfg)
    had_own = "generate" in vars(model)
    original = getattr(model, "generate", None)
    object.__setattr__(model, _ATTR, {"model": ours, "had_own": had_own, "original": original})
    object.__setattr__(model, "generate", _fast_generate(ours, original, return_nfe))
    return model


def unpatch(model: Any) -> Any:
    """Restore the ``generate`` that :func:`patch` replaced. Returns ``model``."""
    state = vars(model).get(_ATTR)
    if state is None:
        return model
    if state["had_own"]:
        object.__setattr__(model, "generate", state["original"])
    else:
        object.__delattr__(model, "generate")
    object.__delattr__(model, _ATTR)
    return model


def is_patched(model: Any) -> bool:
    return _ATTR in vars(model)
