"""The slow, faithful twin: an NLD checkpoint wired into transformers' own Ministral-3 / Pixtral / Mistral-3 modules.

This is the ground truth the fast path is checked against, so it uses upstream building blocks the way the
upstream remote code does: a ``Ministral3Model`` backbone (YaRN RoPE + Llama-4 query scaling come from
transformers), a ``PixtralVisionModel`` tower and a ``Mistral3MultiModalProjector`` attached under ``encoder``,
and an untied ``diffusion_head``. The module tree mirrors the checkpoint's key names exactly, so loading is a
strict ``load_state_dict`` after an explicit key/shape check.

Attention modes (see ``spec/nld-model.md``):

- causal (prefill, block commit): :meth:`TwinModel.causal_forward` writes the block's K/V to the cache;
- diffusion (denoise step): :meth:`TwinModel.diffusion_forward` lets the block attend to the whole cached prefix
  and to itself with no mask, at positions ``past_len + arange(L)``, and leaves the cache as it found it.

The linear_spec draft adapter (``linear_spec_lora/``, when the checkpoint has one) is read into
:attr:`TwinModel.draft_lora` and switched on PEFT-style by :meth:`TwinModel.draft_adapter`, independently of how
our model applies it. The cache is passed to transformers under the argument name the installed version takes
(``cache`` since the 5.x rename, ``past_key_values`` on the oldest 5.x; checked once by signature).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import NLDConfig, load_config
from .model.lora import DraftLoRA, load_draft_lora
from .model.weights import check_keys, read_safetensors

if TYPE_CHECKING:
    from transformers import DynamicCache, Ministral3Config, Mistral3Config, PixtralVisionConfig

__all__ = ["TwinModel", "load_twin", "crop_cache", "build_text_config", "build_vision_config", "build_projector_config",
           "read_safetensors", "check_keys"]

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
_ATTN_IMPLS = ("eager", "sdpa")


def build_text_config(cfg: NLDConfig, attn_implementation: str = "eager") -> Ministral3Config:
    """A transformers ``Ministral3Config`` equivalent to ``cfg``'s text backbone.

    Llama-4 query scaling is always switched on in transformers' attention; when the checkpoint has none, beta 0
    makes the scale exactly 1.
    """
    from transformers import Ministral3Config

    t = cfg.text
    rope = t.rope.to_dict()
    if rope.get("llama_4_scaling_beta") is None:
        rope["llama_4_scaling_beta"] = 0.0
    rope.setdefault("original_max_position_embeddings", t.max_position_embeddings)
    return Ministral3Config(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids),
        tie_word_embeddings=False,
        rope_parameters=rope,
        sliding_window=None,
        attn_implementation=attn_implementation,
    )


def build_vision_config(cfg: NLDConfig, attn_implementation: str = "eager") -> PixtralVisionConfig:
    """A transformers ``PixtralVisionConfig`` for ``cfg.vision``."""
    from transformers import PixtralVisionConfig

    v = cfg.vision
    if v is None:
        raise ValueError("build_vision_config needs a VLM config (vision_config is missing)")
    return PixtralVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        attn_implementation=attn_implementation,
    )


def build_projector_config(cfg: NLDConfig, text_config: Ministral3Config,
                           vision_config: PixtralVisionConfig) -> Mistral3Config:
    """The ``Mistral3Config`` that ``Mistral3MultiModalProjector`` reads its sizes and activation from.

    Its attention implementation is the text config's: constructing it propagates that value to both sub-configs.
    """
    from transformers import Mistral3Config

    return Mistral3Config(
        attn_implementation=text_config._attn_implementation,
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=cfg.image_pad_token_id,
        projector_hidden_act=cfg.projector_hidden_act,
        vision_feature_layer=cfg.vision_feature_layer,
        multimodal_projector_bias=cfg.multimodal_projector_bias,
        spatial_merge_size=cfg.spatial_merge_size,
    )


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Skip random initialisation (every parameter is overwritten by the checkpoint)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    with no_init_weights():
        yield


class TwinModel(nn.Module):
    """NLD (text or VLM) built from transformers modules; module names match the checkpoint keys.

    ``encoder`` is a ``Ministral3Model`` (``embed_tokens``, ``layers``, ``norm``) that, for the VLM, also holds
    ``vision_tower`` (``PixtralVisionModel``) and ``multi_modal_projector`` (``Mistral3MultiModalProjector``), as
    in the upstream module layout. ``diffusion_head`` is ``Linear(hidden, vocab, bias=False)``.
    """

    #: Marks objects the reference sampler may drive directly (test fakes set it too).
    is_reference_twin = True

    def __init__(self, config: NLDConfig, attn_implementation: str = "eager") -> None:
        super().__init__()
        from transformers import Ministral3Model

        if attn_implementation not in _ATTN_IMPLS:
            raise ValueError(f"attn_implementation must be one of {_ATTN_IMPLS}, got {attn_implementation!r}")
        self.config = config
        self.attn_implementation = attn_implementation
        self.text_config = build_text_config(config, attn_implementation)
        if config.is_vlm:
            # All configs first: building the Mistral3Config rewrites its sub-configs' attention implementation.
            self.vision_config = build_vision_config(config, attn_implementation)
            self.projector_config = build_projector_config(config, self.text_config, self.vision_config)
        self.encoder = Ministral3Model(self.text_config)
        if config.is_vlm:
            from transformers import PixtralVisionModel
            from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

            self.encoder.vision_tower = PixtralVisionModel(self.vision_config)
            self.encoder.multi_modal_projector = Mistral3MultiModalProjector(self.projector_config)
        self.diffusion_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        #: The linear_spec draft adapter read from ``linear_spec_lora/`` (fp32), or None.
        self.draft_lora: DraftLoRA | None = None

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    def new_cache(self) -> DynamicCache:
        """An empty ``DynamicCache`` for one generation."""
        from transformers import DynamicCache

        return DynamicCache(config=self.text_config)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected image features ``[n_tokens, hidden]`` (model dtype) for ``pixel_values`` ``[n, 3, H, W]`` and
        ``image_sizes`` ``[n, 2]`` (pixels, long): tower hidden state at ``vision_feature_layer``, then the
        projector on the squeezed features, as upstream."""
        if not self.config.is_vlm:
            raise ValueError("pixel_values were given but this checkpoint has no vision tower (text-only NLD)")
        tower = self.encoder.vision_tower
        out = tower(pixel_values.to(device=self.device, dtype=self.dtype), image_sizes=image_sizes,
                    output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]
        return self.encoder.multi_modal_projector(feats.squeeze(0), image_sizes)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[B, S, hidden]`` (model dtype) for ``input_ids`` ``[B, S]``; with ``pixel_values`` the
        image features replace the embeddings at the image-token positions (row-major over the batch)."""
        embeds = self.encoder.embed_tokens(input_ids.to(self.device))
        if pixel_values is None:
            return embeds
        if image_sizes is None:
            n, _, h, w = pixel_values.shape
            image_sizes = torch.tensor([[h, w]] * n, dtype=torch.long)
        image_sizes = image_sizes.to(device=self.device, dtype=torch.long)
        feats = self.image_features(pixel_values, image_sizes)
        is_image = input_ids.to(self.device) == self.config.image_pad_token_id
        n_tokens = int(is_image.sum())
        if n_tokens != feats.shape[0]:
            raise ValueError(f"image features and image tokens do not match: {n_tokens} image tokens "
                             f"(id {self.config.image_pad_token_id}) in input_ids, {feats.shape[0]} features from "
                             f"pixel_values {tuple(pixel_values.shape)} with image_sizes {image_sizes.tolist()}")
        return embeds.masked_scatter(is_image.unsqueeze(-1).expand_as(embeds), feats.to(embeds.dtype))

    def _run_encoder(self, inputs_embeds: torch.Tensor, cache: DynamicCache, **kw: object) -> torch.Tensor:
        """The backbone over ``inputs_embeds`` with ``cache``, passed under the name this transformers takes:
        ``cache=`` (5.x after the rename; ``past_key_values`` is deprecated there and removed in 5.40) or
        ``past_key_values=`` (the oldest 5.x). Returns the last hidden state."""
        out = self.encoder(inputs_embeds=inputs_embeds, **{_cache_kwarg(): cache}, use_cache=True, **kw)
        return out.last_hidden_state

    @contextlib.contextmanager
    def draft_adapter(self, enabled: bool = True) -> Iterator[None]:
        """Switch the ``linear_spec_lora`` draft adapter (:attr:`draft_lora`) on for the forwards inside, the way
        PEFT's ``lora.Linear`` computes it: forward hooks that add ``lora_B(lora_A(x)) * scaling`` (in the
        adapter's fp32) to each adapted projection's output. No adapter, or ``enabled`` False: nothing changes."""
        lora = self.draft_lora
        if lora is None or not enabled:
            yield
            return
        handles = []
        for (i, proj), (a, b) in lora.weights.items():
            module = getattr(self.encoder.layers[i].self_attn, proj)
            a_, b_ = a.to(self.device), b.to(self.device)

            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, a_=a_, b_=b_) -> torch.Tensor:
                x = args[0].to(a_.dtype)
                return (out.to(a_.dtype) + F.linear(F.linear(x, a_), b_) * lora.scale).to(out.dtype)

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _positions(self, cache: DynamicCache, length: int) -> tuple[int, torch.Tensor]:
        past = cache.get_seq_length()
        return past, (past + torch.arange(length, device=self.device)).unsqueeze(0)

    @torch.no_grad()
    def causal_forward(self, inputs_embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Causal forward of ``inputs_embeds`` ``[B, S, hidden]`` after the cached prefix; appends its K/V to
        ``cache``. Returns logits ``[B, S, vocab]`` in the model dtype (``logits[i]`` predicts token ``i + 1``)."""
        _, pos = self._positions(cache, inputs_embeds.shape[1])
        return self.diffusion_head(self._run_encoder(inputs_embeds, cache, position_ids=pos))

    @torch.no_grad()
    def diffusion_forward(self, inputs_embeds_block: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Diffusion-mode forward of one block ``[B, L, hidden]``: every block token attends to the whole cached
        prefix and to the whole block (no mask), at positions ``past_len + arange(L)``. The cache is left as it
        was (the block's K/V are appended for the call, then cropped off). Returns unshifted logits
        ``[B, L, vocab]`` in the model dtype (``logits[i]`` predicts token ``i``)."""
        b, length = inputs_embeds_block.shape[:2]
        past, pos = self._positions(cache, length)
        # An explicit 4-D additive mask of zeros: transformers uses a prepared 4-D mask as-is, so nothing is masked.
        full = torch.zeros(b, 1, length, past + length, dtype=inputs_embeds_block.dtype, device=self.device)
        try:
            hidden = self._run_encoder(inputs_embeds_block, cache, attention_mask=full, position_ids=pos)
        finally:
            crop_cache(cache, past)
        return self.diffusion_head(hidden)


def crop_cache(cache: DynamicCache, keep: int) -> None:
    """Keep the first ``keep`` positions of ``cache``. Passed as a negative count (tokens to remove), the one
    form every transformers 5.x accepts: 5.24 rejects the 4.x-style absolute length that upstream's
    ``_crop_dynamic_cache`` passes."""
    grown = cache.get_seq_length() - keep
    if grown > 0:
        cache.crop(-grown)


@functools.cache
def _cache_kwarg() -> str:
    """The name ``Ministral3Model.forward`` takes the cache under in the installed transformers."""
    from transformers import Ministral3Model

    return "cache" if "cache" in inspect.signature(Ministral3Model.forward).parameters else "past_key_values"


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: NLDConfig) -> torch.dtype:
    if dtype is None:
        dtype = cfg.dtype or "float32"
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (supported: {sorted(_DTYPES)})")
        dtype = _DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def load_twin(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
              attn_implementation: str = "sdpa") -> TwinModel:
    """Load the checkpoint in ``path`` into a :class:`TwinModel` on ``device``.

    ``attn_implementation`` defaults to ``"sdpa"``: upstream runs flash-attention, a fused kernel that keeps the
    attention probabilities in fp32 up to the PV product; transformers' ``"eager"`` rounds them to the model dtype
    first, which in bf16 changes tokens (measured: 89% bf16 token agreement with our fused path under eager, 100%
    under sdpa on the parity matrix). In fp32 both agree with our model to 1e-4.

    ``dtype`` defaults to the checkpoint's ``config.json`` dtype (float32 when absent). Keys and shapes are
    checked strictly before loading: any missing, unexpected or mis-shaped tensor raises
    :class:`~nemotron_fast.errors.CheckpointError` naming it.
    """
    cfg = load_config(path)
    dt = _resolve_dtype(dtype, cfg)
    found = read_safetensors(path, shapes_only=True)
    with _skip_init():
        model = TwinModel(cfg, attn_implementation)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, found)  # type: ignore[arg-type]
    # Parameters take the model dtype; buffers (RoPE inverse frequencies) stay fp32, as with from_pretrained.
    model.to(device=device)
    for param in model.parameters():
        param.data = param.data.to(dt)
    model.load_state_dict(read_safetensors(path), strict=True)
    model.draft_lora = load_draft_lora(path, cfg.text.num_hidden_layers)
    model.eval()
    return model
