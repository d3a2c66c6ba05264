"""Pixtral image preprocessing and the image-token layout.

Matches transformers' PIL Pixtral image processor (``PixtralImageProcessorPil``) as the Mistral3/Pixtral
processor drives it, i.e. with an effective patch of ``patch_size * spatial_merge_size``:

1. convert to RGB, compositing any transparency onto white;
2. if either side is over ``longest_edge``: scale both sides by the same ratio ``max(h, w) / longest_edge``,
   each FLOORED; then round each side UP to a multiple of the effective patch (so a side can end up to one
   patch above ``longest_edge`` when it is not itself a multiple of the patch);
3. bicubic resize of the uint8 image with PIL (always, even when the size is unchanged: a no-op then);
4. rescale by ``rescale_factor`` (1/255) and normalise with the CLIP mean/std, in float32.

Layout of one image in the prompt (Pixtral convention): ``rows = H / (patch * merge)`` rows of
``cols = W / (patch * merge)`` ``[IMG]`` tokens, each row followed by ``[IMG_BREAK]`` except the last, which is
followed by ``[IMG_END]``: ``rows * cols + rows`` tokens in all.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..config import NLDConfig, PreprocessorConfig
from ..errors import ConfigError

__all__ = ["to_rgb", "resized_size", "preprocess_image", "image_token_ids", "num_image_tokens", "pad_and_stack"]


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; transparency (an alpha band or a palette/tRNS transparent colour) goes onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resized_size(height: int, width: int, longest_edge: int, patch: int) -> tuple[int, int]:
    """Target ``(H, W)`` for an image of ``height x width``: fit ``longest_edge`` (floor), then round up to ``patch``.

    ``patch`` is the effective patch ``patch_size * spatial_merge_size``. Both outputs are >= ``patch``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height / longest_edge, width / longest_edge)
    if ratio > 1:
        height = int(math.floor(height / ratio))
        width = int(math.floor(width / ratio))
    # ceil(x / patch) * patch, written so that a side floored to 0 still gets one patch.
    return ((height - 1) // patch + 1) * patch, ((width - 1) // patch + 1) * patch


def _effective_patch(pre: PreprocessorConfig, spatial_merge_size: int) -> int:
    if spatial_merge_size <= 0:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    return pre.patch_size * spatial_merge_size


def preprocess_image(img: Image.Image, pre: PreprocessorConfig, spatial_merge_size: int
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One PIL image to ``(pixel_values, (H, W))``.

    ``pixel_values`` is float32 ``[3, H, W]`` (contiguous), H and W multiples of
    ``pre.patch_size * spatial_merge_size``; the steps follow ``pre``'s ``do_*`` flags (see module docstring).
    """
    patch = _effective_patch(pre, spatial_merge_size)
    if pre.do_convert_rgb:
        img = to_rgb(img)
    elif img.mode != "RGB":
        raise ValueError(f"do_convert_rgb is false but the image mode is {img.mode!r}, not 'RGB'")
    w, h = img.size
    if pre.do_resize:
        th, tw = resized_size(h, w, pre.longest_edge, patch)
        img = img.resize((tw, th), resample=Image.Resampling.BICUBIC)
    elif h % patch or w % patch:
        raise ValueError(f"do_resize is false but the image size {h}x{w} is not a multiple of {patch}")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32)
    if pre.do_rescale:
        x = x * pre.rescale_factor
    if pre.do_normalize:
        mean = torch.tensor(pre.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(pre.image_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
    return x.contiguous(), (int(x.shape[1]), int(x.shape[2]))


def _layout_ids(cfg: NLDConfig) -> tuple[int, int, int, int]:
    if not cfg.is_vlm or cfg.vision is None:
        raise ConfigError("this checkpoint is text-only: it has no image tokens", field="vision_config")
    img, brk, end = cfg.image_token_id, cfg.image_break_token_id, cfg.image_end_token_id
    if img is None or brk is None or end is None:
        raise ConfigError("the image token layout needs image_token_id, image_break_token_id and image_end_token_id",
                          field="image_break_token_id" if brk is None else "image_end_token_id")
    return img, brk, end, cfg.vision.patch_size * cfg.spatial_merge_size


def num_image_tokens(height: int, width: int, cfg: NLDConfig) -> int:
    """Count of prompt tokens for one preprocessed ``height x width`` image: ``rows * cols + rows``."""
    *_, patch = _layout_ids(cfg)
    rows, cols = _grid(height, width, patch)
    return rows * cols + rows


def _grid(height: int, width: int, patch: int) -> tuple[int, int]:
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ValueError(f"preprocessed image size {height}x{width} must be positive multiples of {patch}")
    return height // patch, width // patch


def image_token_ids(height: int, width: int, cfg: NLDConfig) -> list[int]:
    """Token ids standing for one preprocessed ``height x width`` image.

    ``rows`` rows of ``cols`` image tokens, each row closed by ``image_break_token_id``, the last row by
    ``image_end_token_id`` instead (rows = H / (patch*merge), cols = W / (patch*merge)).
    """
    img, brk, end, patch = _layout_ids(cfg)
    rows, cols = _grid(height, width, patch)
    row = [img] * cols + [brk]
    ids = row * rows
    ids[-1] = end
    return ids


def pad_and_stack(pixel_values: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``[3, H_i, W_i]`` tensors into ``[n, 3, max H, max W]`` float32, zero-padded at the bottom/right."""
    if not pixel_values:
        raise ValueError("pad_and_stack needs at least one image")
    max_h = max(int(p.shape[1]) for p in pixel_values)
    max_w = max(int(p.shape[2]) for p in pixel_values)
    out = torch.zeros(len(pixel_values), 3, max_h, max_w, dtype=torch.float32)
    for i, p in enumerate(pixel_values):
        out[i, :, : p.shape[1], : p.shape[2]] = p
    return out
