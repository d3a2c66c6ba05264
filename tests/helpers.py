"""Small builders shared by tests (prompts with the Pixtral image-token layout, seeded)."""

from __future__ import annotations

import torch


def text_ids(cfg, n: int, g: torch.Generator) -> torch.Tensor:
    """n ordinary (non-special) token ids."""
    lo = 1000 if cfg.vocab_size > 2000 else 200
    return torch.randint(lo, cfg.vocab_size, (n,), generator=g)


def vlm_prompt(cfg, seed: int, n_text: int = 8,
               grids: tuple[tuple[int, int], ...] = ((2, 3), (1, 2))) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """A prompt with images of the given merged-grid sizes -> (ids [1, T], pixel_values, image_sizes)."""
    g = torch.Generator().manual_seed(seed)
    unit = cfg.vision.patch_size * cfg.spatial_merge_size
    sizes = torch.tensor([[r * unit, c * unit] for r, c in grids])
    parts = [torch.tensor([cfg.bos_token_id]), text_ids(cfg, 5, g)]
    for rows, cols in grids:
        for r in range(rows):
            parts.append(torch.full((cols,), cfg.image_token_id))
            parts.append(torch.tensor([cfg.image_end_token_id if r == rows - 1 else cfg.image_break_token_id]))
    parts.append(text_ids(cfg, n_text, g))
    pix = torch.randn(len(grids), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), generator=g)
    return torch.cat(parts).view(1, -1), pix, sizes


def text_prompt(cfg, seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([cfg.bos_token_id]), text_ids(cfg, n - 1, g)]).view(1, -1)
