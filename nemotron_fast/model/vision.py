"""The Pixtral vision tower and the Mistral3 multimodal projector, with transformers' module names so the
checkpoint keys (``encoder.vision_tower.*``, ``encoder.multi_modal_projector.*``) load directly.

The tower runs once per request; its output enters only the causal prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NLDConfig, VisionConfig
from .layers import MLP, RMSNorm, rotate_half

__all__ = ["PixtralVisionTower", "MultiModalProjector"]

# transformers' Pixtral hard-codes this epsilon; the vision config has no field for it.
_PIXTRAL_NORM_EPS = 1e-5


class _VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """x [1, N, hidden]: the patches of all images; ``segments`` the patch count of each image. Projections run
        over all patches at once, attention within each image (what a block-diagonal mask would compute, without
        an [N, N] mask: a batch of large images would not fit one)."""
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if len(segments) == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs) for qs, ks, vs in
                             zip(q.split(segments, 2), k.split(segments, 2), v.split(segments, 2))], dim=2)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class _VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, _PIXTRAL_NORM_EPS)
        self.attention = _VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, _PIXTRAL_NORM_EPS)
        self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[int]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, segments)
        return x + self.feed_forward(self.ffn_norm(x))


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PixtralVisionTower(nn.Module):
    """Conv patch embedding, RMSNorm, bidirectional ViT with 2-D axial RoPE; images attend only to themselves."""

    def __init__(self, cfg: VisionConfig, feature_layer: int = -1) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, _PIXTRAL_NORM_EPS)
        self.transformer = _VisionTransformer(cfg)
        # hidden states are [input of layer 0, output of layer 0, ...]; run only the layers the feature needs
        n_states = cfg.num_hidden_layers + 1
        self.num_layers_run = feature_layer % n_states
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the 2-D RoPE frequencies: even-indexed ones rotate with the row, odd ones with the column."""
        dim = self.cfg.head_dim
        with torch.device(device or "cpu"):
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq_h", inv[0::2].clone(), persistent=False)
        self.register_buffer("inv_freq_w", inv[1::2].clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, C, H_max, W_max] (padded), image_sizes int64 [n, 2] (H, W in pixels)
        -> features [sum(h_i * w_i), hidden] (patches of all images, row-major per image)."""
        weight = self.patch_conv.weight
        embeds = self.patch_conv(pixel_values.to(weight.dtype))
        grids = [(int(h) // self.patch_size, int(w) // self.patch_size) for h, w in image_sizes.tolist()]
        pieces, pos = [], []
        for e, (gh, gw) in zip(embeds, grids):
            pieces.append(e[:, :gh, :gw].flatten(1).T)
            hh, ww = torch.meshgrid(torch.arange(gh, device=e.device), torch.arange(gw, device=e.device),
                                    indexing="ij")
            pos.append(torch.stack([hh.flatten(), ww.flatten()], dim=-1))
        x = self.ln_pre(torch.cat(pieces).unsqueeze(0))
        p = torch.cat(pos)
        half = torch.cat([p[:, :1].float() * self.inv_freq_h, p[:, 1:].float() * self.inv_freq_w], dim=-1)
        emb = torch.cat([half, half], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        segments = [h * w for h, w in grids]
        for layer in self.transformer.layers[: self.num_layers_run]:
            x = layer(x, cos, sin, segments)
        return x.squeeze(0)


class _PatchMerger(nn.Module):
    def __init__(self, hidden: int, merge: int, patch: int) -> None:
        super().__init__()
        self.merge, self.patch = merge, patch
        self.merging_layer = nn.Linear(hidden * merge * merge, hidden, bias=False)

    def forward(self, feats: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        grids = [(int(h) // self.patch, int(w) // self.patch) for h, w in image_sizes.tolist()]
        d, m = feats.shape[-1], self.merge
        out = []
        for f, (gh, gw) in zip(feats.split([h * w for h, w in grids]), grids):
            grid = f.view(gh, gw, d).permute(2, 0, 1).unsqueeze(0)
            # each merged token gathers an m x m neighbourhood, channel-major, as F.unfold orders it
            out.append(F.unfold(grid, kernel_size=m, stride=m).view(d * m * m, -1).t())
        return self.merging_layer(torch.cat(out))


class MultiModalProjector(nn.Module):
    """RMSNorm -> 2x2 patch merger -> linear_1 -> GELU -> linear_2 (vision hidden -> text hidden)."""

    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        assert cfg.vision is not None
        vh, th = cfg.vision.hidden_size, cfg.text.hidden_size
        self.norm = RMSNorm(vh, cfg.text.rms_norm_eps)
        self.patch_merger = _PatchMerger(vh, cfg.spatial_merge_size, cfg.vision.patch_size)
        self.linear_1 = nn.Linear(vh, th, bias=False)
        self.linear_2 = nn.Linear(th, th, bias=False)
        self.act = F.gelu if cfg.projector_hidden_act == "gelu" else F.silu

    def forward(self, feats: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """feats [N_patches, vision_hidden] -> [N_merged, text_hidden]."""
        x = self.patch_merger(self.norm(feats), image_sizes)
        return self.linear_2(self.act(self.linear_1(x)))
