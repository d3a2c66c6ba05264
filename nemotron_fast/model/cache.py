"""A preallocated, shape-static KV cache shared by prefill, denoise steps and commits.

Layout: ``k``/``v`` are ``[num_layers, B, num_kv_heads, max_len, head_dim]``. Rows may have different prompt
lengths: prompts are left-padded so every row's prefix ends at the same slot, and ``pad[b]`` slots at the
start of row ``b`` are never attended to. A denoise step writes the block's K/V to the slots right after the
prefix (scratch, not committed); the commit forward overwrites the same slots with causal K/V and advances
``length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig

__all__ = ["KVCache"]


@dataclass
class KVCache:
    k: torch.Tensor
    v: torch.Tensor
    pad: torch.Tensor
    length: int = 0
    has_pad: bool = False

    @classmethod
    def allocate(cls, cfg: TextConfig, batch: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str, pad: torch.Tensor | None = None) -> KVCache:
        """Zeroed cache for ``batch`` rows of up to ``max_len`` slots; ``pad`` int64 [B] left-padding per row."""
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if pad is None:
            pad = torch.zeros(batch, dtype=torch.long, device=device)
        if pad.shape != (batch,):
            raise ValueError(f"pad must have shape [{batch}], got {tuple(pad.shape)}")
        pad = pad.to(device=device, dtype=torch.long)
        # one host sync at allocation, so no step ever has to ask whether rows are padded
        has_pad = bool((pad != 0).any())
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   pad, 0, has_pad)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache holding only ``rows`` (int64 indices) - used to drop finished rows from a batch."""
        pad = self.pad[rows]
        return KVCache(self.k[:, rows], self.v[:, rows], pad, self.length, bool((pad != 0).any()))
