"""Building blocks of the Ministral-3 text backbone: RMSNorm, YaRN RoPE with Llama-4 query scaling, GQA
attention over a preallocated KV cache, and the SwiGLU MLP.

Numerics follow transformers' Ministral3 classes (the checking twin): RMSNorm in fp32 with the weight applied
after casting back, cos/sin computed in fp32 and cast to the model dtype, the query scale applied after RoPE.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeConfig, TextConfig
from ..kernels.block_attention import block_attention
from .lora import lora_delta

__all__ = ["CAUSAL", "BlockSlots", "RMSNorm", "RotaryEmbedding", "yarn_inv_freq", "Attention", "MLP", "DecoderLayer",
           "rotate_half"]


#: ``attn_mask`` value for a causal forward from cache slot 0 with no padding: SDPA's ``is_causal`` instead of a
#: boolean mask, so CUDA can use its fused backends for the prefill.
CAUSAL = "causal"


class BlockSlots(NamedTuple):
    """Where a block's tokens sit in a static cache, as device tensors: ``starts`` int64 [B] (the slot of each
    row's first new token, i.e. its valid prefix ends there), ``pad`` int64 [B] (each row's first valid slot) and
    whether the new tokens attend causally (commit) or bidirectionally (denoise step)."""

    starts: torch.Tensor
    pad: torch.Tensor
    causal: bool


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in fp32, weight applied in the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def yarn_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32) and the cos/sin attention factor, as transformers computes them."""
    dim = head_dim
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope.factor
    if rope.attention_factor is not None:
        attn_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attn_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attn_factor = mscale(factor)
    orig = rope.original_max_position_embeddings
    assert orig is not None

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, plus the Llama-4 per-position query scale."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.beta = cfg.rope.llama_4_scaling_beta
        self.orig_max = cfg.rope.original_max_position_embeddings
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent tables, e.g. after the module was built on the meta device."""
        with torch.device(device or "cpu"):
            inv_freq, self.attention_factor = yarn_inv_freq(self.cfg.rope, self.cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor | None]:
        """positions: int64 [B, T] -> cos, sin [B, T, head_dim] in ``dtype``; q_scale [B, 1, T, 1] or None."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        q_scale = None
        if self.beta is not None:
            assert self.orig_max is not None
            scale = 1 + self.beta * torch.log(1 + torch.floor(positions / self.orig_max))
            q_scale = scale[:, None, :, None].to(dtype)
        return cos, sin, q_scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """GQA attention. With a cache, the new tokens' K/V are written to slots ``[start, start + T)`` of the
    preallocated cache and the queries attend over the contiguous view ``[0, start + T)`` (no concatenation)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        attn_mask: torch.Tensor | str | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        slots: torch.Tensor | None = None,
        lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
        block: BlockSlots | None = None,
    ) -> torch.Tensor:
        """x [B, T, H]; attn_mask bool [B, 1, T, S] (True = attend), None (full attention) or :data:`CAUSAL`
        (queries and keys aligned at slot 0, lower-triangular);
        kv: this layer's cache (k, v), each [B, Hkv, S_max, D].

        ``slots`` int64 [B, T] (optional): per-row cache slots of the new tokens, for rows whose cached lengths
        differ (linear_spec); the keys then span ``[0, start)`` with ``start`` the caller's bound on every row's
        ``slots + 1``. ``lora``: projection name -> (A, B, scale), a low-rank delta added to that projection
        (the linear_spec draft adapter).

        ``block`` (the fixed-shape decode path): row ``b``'s T new tokens go to slots ``[starts[b], starts[b] + T)``
        of the static cache, read on the device, and attend to the row's valid prefix ``[pad[b], starts[b])`` plus
        the new tokens (all of them, or causally): :func:`~nemotron_fast.kernels.block_attention.block_attention`,
        the Triton kernel on CUDA and its SDPA twin elsewhere. ``attn_mask`` and ``start`` are unused then."""
        b, t, _ = x.shape
        q = self._proj("q_proj", x, lora).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self._proj("k_proj", x, lora).view(b, t, self.num_kv, self.head_dim).transpose(1, 2)
        v = self._proj("v_proj", x, lora).view(b, t, self.num_kv, self.head_dim).transpose(1, 2)
        cos, sin, q_scale = rope
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if q_scale is not None:
            q = q * q_scale
        if block is not None:
            assert kv is not None, "the block path needs the layer's cache"
            out = block_attention(q, kv[0], kv[1], k, v, block.starts, block.pad, causal=block.causal)
            return self._proj("o_proj", out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), lora)
        if kv is not None and slots is not None:
            ck, cv = kv
            rows = torch.arange(b, device=x.device)[:, None]
            ck[rows, :, slots] = k.transpose(1, 2)
            cv[rows, :, slots] = v.transpose(1, 2)
            k, v = ck[:, :, :start], cv[:, :, :start]
        elif kv is not None:
            ck, cv = kv
            ck[:, :, start:start + t] = k
            cv[:, :, start:start + t] = v
            k, v = ck[:, :, :start + t], cv[:, :, :start + t]
        gqa = self.num_kv != self.num_heads
        if isinstance(attn_mask, str):  # CAUSAL: no mask tensor, so SDPA may pick its fused (flash) kernels
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self._proj("o_proj", out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), lora)

    def _proj(self, name: str, x: torch.Tensor, lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None
              ) -> torch.Tensor:
        y = getattr(self, name)(x)
        if lora is None or name not in lora:
            return y
        return lora_delta(x, y, lora[name])


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = F.silu if act == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention then MLP, each with a residual."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                attn_mask: torch.Tensor | str | None, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, slots: torch.Tensor | None = None,
                lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
                block: BlockSlots | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn_mask, kv, start, slots, lora, block)
        return x + self.mlp(self.post_attention_layernorm(x))
