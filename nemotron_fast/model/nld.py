"""Our compact Nemotron-Labs-Diffusion model: the Ministral-3 backbone with an untied ``diffusion_head``, and for
the VLM the Pixtral tower and Mistral3 projector. Module names equal the checkpoint keys.

Two attention modes share one code path over a preallocated :class:`KVCache`:
- ``causal`` (prefill, commit): each new token attends to the valid cached prefix and to earlier new tokens;
  the new K/V stay in the cache.
- ``diffusion`` (denoise step): the block attends bidirectionally to the valid prefix and to itself. Its K/V
  are written to the scratch slots after the prefix and are overwritten by the commit, so the committed cache
  is never changed by a denoise step.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import NLDConfig, load_config
from .cache import KVCache
from .layers import CAUSAL, BlockSlots, DecoderLayer, RMSNorm, RotaryEmbedding
from .lora import DraftLoRA, load_draft_lora
from .vision import MultiModalProjector, PixtralVisionTower
from .weights import load_state_dict_strict

__all__ = ["NLDModel", "load", "load_model_lora"]

Mode = Literal["causal", "diffusion"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Encoder(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        if cfg.vision is not None:
            self.vision_tower = PixtralVisionTower(cfg.vision, cfg.vision_feature_layer)
            self.multi_modal_projector = MultiModalProjector(cfg)


class NLDModel(nn.Module):
    """The model. ``checkpoint_path`` is set by :func:`load`; ``processor`` loads the tokenizer lazily."""

    def __init__(self, config: NLDConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.diffusion_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.text)
        self.checkpoint_path: str | None = None
        #: The linear_spec draft adapter (``linear_spec_lora/``), fp32 on the model's device, or None.
        self.draft_lora: DraftLoRA | None = None

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    @cached_property
    def processor(self) -> Any:
        """The checkpoint's :class:`nemotron_fast.processing.Processor` (tokenizer, chat template, images)."""
        from ..processing import Processor

        if self.checkpoint_path is None:
            raise RuntimeError("this model was not loaded from a checkpoint directory; it has no tokenizer")
        return Processor.from_pretrained(self.checkpoint_path, self.config)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # ---- inputs -------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W], image_sizes int64 [n, 2] -> projected features [N_merged, hidden]."""
        if self.config.vision is None:
            raise ValueError("this checkpoint has no vision tower; pixel_values are not accepted")
        feats = self.encoder.vision_tower(pixel_values.to(self.device), image_sizes)
        return self.encoder.multi_modal_projector(feats, image_sizes)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_sizes: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids int64 [B, T] -> embeddings [B, T, hidden]; image features replace the ``<|image_pad|>`` slots
        only (the image start/break/end markers keep their token embeddings)."""
        embeds = self.encoder.embed_tokens(input_ids)
        if pixel_values is None and image_features is None:
            return embeds
        if image_features is None:
            if image_sizes is None:
                raise ValueError("pixel_values need image_sizes")
            image_features = self.image_features(pixel_values, image_sizes)
        slots = input_ids == self.config.image_pad_token_id
        n_slots, n_feats = int(slots.sum()), image_features.shape[0]
        if n_slots != n_feats:
            raise ValueError(f"the prompt has {n_slots} <|image_pad|> tokens but the images give {n_feats} features")
        return embeds.masked_scatter(slots.unsqueeze(-1), image_features.to(embeds.dtype))

    # ---- forwards ------------------------------------------------------------------------------------------
    def forward_hidden(self, embeds: torch.Tensor, *, cache: KVCache | None = None, start: int = 0,
                       mode: Mode = "causal", attn_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, row_start: list[int] | None = None,
                       lora: bool = False, starts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the backbone; returns the final-normed hidden states [B, T, hidden].

        With ``cache``: the T tokens occupy slots ``[start, start + T)``; masks and positions follow from the
        cache's per-row padding and ``mode``. ``row_start`` (one int per row) instead puts row ``b``'s tokens at
        ``[row_start[b], row_start[b] + T)``: rows whose cached lengths differ (linear_spec after ragged
        acceptances); each row sees only its own valid slots. Without a cache (training): ``attn_mask`` bool
        [B, 1, T, T] (True = attend; None = causal) and ``positions`` int64 [B, T] (default ``arange(T)``).
        ``lora`` switches on the draft adapter (:attr:`draft_lora`) for this forward. ``starts`` int64 [B] on the
        device (the fixed-shape decode path, CUDA-graph safe: nothing is read back to the host) puts row ``b``'s
        tokens at ``[starts[b], starts[b] + T)``; positions and masks are derived on the device and attention runs
        as :func:`~nemotron_fast.kernels.block_attention.block_attention` over the row's valid cache.
        """
        b, t, _ = embeds.shape
        dev = embeds.device
        slots = block = None
        if lora and self.draft_lora is None:
            raise ValueError("lora=True but this model has no draft adapter (draft_lora is None)")
        if cache is not None and starts is not None:
            positions = (starts[:, None] + torch.arange(t, device=dev) - cache.pad[:, None]).clamp(min=0)
            block = BlockSlots(starts, cache.pad, mode == "causal")
        elif cache is not None and row_start is not None:
            if len(row_start) != b:
                raise ValueError(f"row_start needs one start per row ({b}), got {len(row_start)}")
            start = max(row_start) + t
            if start > cache.max_len:
                raise ValueError(f"cache overflow: slots up to {start} exceed max_len {cache.max_len}")
            first = torch.tensor(row_start, dtype=torch.long, device=dev)
            slots = first[:, None] + torch.arange(t, device=dev)
            positions = (slots - cache.pad[:, None]).clamp(min=0)
            attn_mask = self._rows_mask(cache, first, slots, start, mode)
        elif cache is not None:
            if start + t > cache.max_len:
                raise ValueError(f"cache overflow: slots {start}..{start + t} exceed max_len {cache.max_len}")
            new_slots = start + torch.arange(t, device=dev)
            # padded slots get position 0 (negative positions would hit log(0) in the Llama-4 query scale)
            positions = (new_slots[None, :] - cache.pad[:, None]).clamp(min=0)
            attn_mask = self._cache_mask(cache, start, t, mode)
        else:
            if positions is None:
                positions = torch.arange(t, device=dev)[None].expand(b, t)
            if attn_mask is None:
                attn_mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None, None]
        rope = self.rotary(positions, embeds.dtype)
        x = embeds
        adapter = self.draft_lora if lora else None
        for i, layer in enumerate(self.encoder.layers):
            delta = None
            if adapter is not None:
                delta = {p: ab for p in adapter.projections if (ab := adapter.layer(i, p)) is not None} or None
            x = layer(x, rope, attn_mask, cache.layer(i) if cache is not None else None, start, slots, delta, block)
        return self.encoder.norm(x)

    @staticmethod
    def _rows_mask(cache: KVCache, first: torch.Tensor, slots: torch.Tensor, span: int, mode: Mode) -> torch.Tensor:
        """bool [B, 1, T, span] for per-row slots: a key is valid for row b when it is past the row's padding and
        before the row's new tokens end (diffusion) or at most the query's own slot (causal). Stale slots of
        rows that are shorter than the longest fall outside both bounds."""
        keys = torch.arange(span, device=slots.device)
        valid = keys[None, :] >= cache.pad[:, None]  # [B, S]
        if mode == "causal":
            return (valid[:, None, :] & (keys[None, None, :] <= slots[:, :, None]))[:, None]
        end = first + slots.shape[1]
        return (valid & (keys[None, :] < end[:, None]))[:, None, None, :].expand(-1, 1, slots.shape[1], -1)

    @staticmethod
    def _cache_mask(cache: KVCache, start: int, t: int, mode: Mode) -> torch.Tensor | str | None:
        """bool [B, 1, T, start + T], None when every key may be attended to, or (CUDA, an unpadded prefill)
        :data:`~nemotron_fast.model.layers.CAUSAL`: no mask tensor, so SDPA can use its flash kernel."""
        dev = cache.k.device
        if dev.type == "cuda" and mode == "causal" and start == 0 and t > 1 and not cache.has_pad:
            return CAUSAL
        keys = torch.arange(start + t, device=dev)
        queries = start + torch.arange(t, device=dev)
        mask = None
        if mode == "causal" and t > 1:
            mask = (keys[None, :] <= queries[:, None])[None, None]
        if cache.has_pad:
            valid = (keys[None, :] >= cache.pad[:, None])[:, None, None, :]
            # a padded query sees only itself: its row must not be empty, or NaN would reach the cached V
            valid = valid | (keys[None, :] == queries[:, None])[None, None]
            mask = valid if mask is None else mask & valid
        return mask

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> logits [..., vocab] in the model dtype."""
        return self.diffusion_head(hidden)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_sizes: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cache-free forward for training and checks: logits [B, T, vocab] (causal unless ``attn_mask``)."""
        return self.head(self.forward_hidden(self.embed(input_ids, pixel_values, image_sizes), attn_mask=attn_mask))

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """A zeroed cache for this model's dtype and device."""
        return KVCache.allocate(self.config.text, batch, max_len, dtype=self.dtype, device=self.device, pad=pad)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_buffers"):
                m.reset_buffers(device)


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: NLDConfig) -> torch.dtype:
    if dtype is None:
        dtype = cfg.dtype or "float32"
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (use one of {sorted(_DTYPES)})")
        return _DTYPES[key]
    if dtype not in _DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    return dtype


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> NLDModel:
    """Load a checkpoint directory (config files + safetensors) into an :class:`NLDModel` in eval mode.

    ``dtype`` defaults to the config's ``dtype`` (bf16 for the real checkpoints). The modules are built on the
    meta device and the checkpoint tensors are assigned directly, so no random init is ever computed.
    """
    cfg = load_config(path)
    dt = _resolve_dtype(dtype, cfg)
    device = torch.device(device)
    with torch.device("meta"):
        model = NLDModel(cfg)
    load_state_dict_strict(model, path, device=device, dtype=dt)
    model.reset_buffers(device)
    model.checkpoint_path = str(Path(path).resolve())
    model.draft_lora = load_model_lora(model, path)
    return model.eval().requires_grad_(False)


def load_model_lora(model: NLDModel, path: str | Path) -> DraftLoRA | None:
    """The checkpoint's ``linear_spec_lora/`` adapter for ``model`` (shapes checked), on its device, or None."""
    t = model.config.text
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    sizes = {"q_proj": (q, t.hidden_size), "k_proj": (kv, t.hidden_size), "v_proj": (kv, t.hidden_size),
             "o_proj": (t.hidden_size, q)}
    lora = load_draft_lora(path, t.num_hidden_layers, sizes)
    return None if lora is None else lora.to(model.device)
