"""Small builders shared by tests (seeded prompts; images in the real marker layout of the processor)."""

from __future__ import annotations

import torch

from nemotron_fast.processing import image_token_ids


def text_ids(cfg, n: int, g: torch.Generator) -> torch.Tensor:
    """n ordinary (non-special) token ids."""
    lo = 1000 if cfg.vocab_size > 2000 else 200
    return torch.randint(lo, cfg.vocab_size, (n,), generator=g)


def vlm_prompt(cfg, seed: int, n_text: int = 8,
               grids: tuple[tuple[int, int], ...] = ((2, 3), (1, 2)), n_pre: int = 5
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``<|im_start|>``, ``n_pre`` text ids, images of the given (rows, cols) cell grids in the marker layout,
    ``n_text`` text ids -> (ids [1, T], pixel_values, image_sizes)."""
    g = torch.Generator().manual_seed(seed)
    unit = cfg.vision.patch_size * cfg.spatial_merge_size
    sizes = torch.tensor([[r * unit, c * unit] for r, c in grids])
    parts = [torch.tensor([cfg.special.im_start]), text_ids(cfg, n_pre, g)]
    for h, w in sizes.tolist():
        parts.append(torch.tensor(image_token_ids(h, w, cfg)))
    parts.append(text_ids(cfg, n_text, g))
    pix = torch.randn(len(grids), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), generator=g)
    return torch.cat(parts).view(1, -1), pix, sizes


def text_prompt(cfg, seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([cfg.special.im_start]), text_ids(cfg, n - 1, g)]).view(1, -1)
