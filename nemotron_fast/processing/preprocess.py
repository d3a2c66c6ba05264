"""The VLM's image encoder and the image-marker layout of the prompt.

Preprocessing is mistral-common's image encoder, which the checkpoint's ``image_processing.py`` ports
(``encode_image``): for an image of ``W x H`` pixels,

1. if the longest side is over ``max_image_size`` (default 1400), divide both sides by
   ``ratio = max(W, H) / max_image_size`` and round with Python's ``round`` (halves to even), at least 1;
2. the token grid is ``w = ceil(W' / cell)`` columns by ``h = ceil(H' / cell)`` rows, ``cell = patch * merge``
   (28); the image is stretched to exactly ``w * cell x h * cell`` pixels;
3. RGB with transparency composited onto white, ``cv2.resize(..., INTER_CUBIC)`` on the float32 array in
   [0, 255] (no antialiasing, no clipping), ``/ 255``, CLIP mean/std, channels first.

Steps 3 is mistral-common's own ``transform_image`` (called, not re-implemented); steps 1-2 are
:func:`image_grid`, the same arithmetic as ``ImageEncoder._image_to_num_tokens`` (a private method there).

Layout of one image in the prompt (upstream ``build_image_token_str``): ``<|image_start|>``, then for each of
the ``h`` rows ``w`` x ``<|image_pad|>`` followed by ``<|image_break|>``, except that the last row ends with
``<|image_end|>`` instead: ``1 + h * (w + 1)`` tokens. Vision features go to the ``<|image_pad|>`` slots only.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..config import ImageEncoderConfig, NLDConfig
from ..errors import ConfigError

__all__ = ["image_grid", "preprocess_image", "image_token_ids", "num_image_tokens", "pad_and_stack",
           "image_encoder_of"]


def image_grid(width: int, height: int, max_image_size: int, cell: int) -> tuple[int, int]:
    """Token grid ``(columns, rows)`` of a ``width x height`` image (see the module docstring, steps 1-2)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_image_size <= 0 or cell <= 0:
        raise ValueError(f"max_image_size and cell must be positive, got {max_image_size} and {cell}")
    w: float = width
    h: float = height
    ratio = max(height / max_image_size, width / max_image_size)
    if ratio > 1:
        w = max(round(width / ratio), 1)
        h = max(round(height / ratio), 1)
    return (int(w) - 1) // cell + 1, (int(h) - 1) // cell + 1


def _transform_image() -> object:
    try:
        from mistral_common.tokens.tokenizers.image import transform_image
    except ImportError as exc:  # pragma: no cover - both are dependencies of the package
        raise ImportError("image preprocessing needs mistral-common>=1.7 and opencv-python-headless "
                          f"(pip install nemotron-fast brings both): {exc}") from exc
    return transform_image


def preprocess_image(img: Image.Image, enc: ImageEncoderConfig, max_image_size: int | None = None
                     ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One PIL image to ``(pixel_values, (H, W))``: float32 ``[3, H, W]`` (contiguous), H and W multiples of
    ``enc.cell``. ``max_image_size`` overrides the checkpoint's cap for this image."""
    cap = enc.max_image_size if max_image_size is None else int(max_image_size)
    cols, rows = image_grid(img.width, img.height, cap, enc.cell)
    size = (cols * enc.cell, rows * enc.cell)
    pixels = _transform_image()(img, size)  # type: ignore[operator]
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return x, (size[1], size[0])


def image_encoder_of(cfg: NLDConfig) -> ImageEncoderConfig:
    """The checkpoint's image encoder settings; ConfigError for a text-only checkpoint."""
    if cfg.image_encoder is None:
        raise ConfigError("this checkpoint is text-only: it has no image encoder", field="vision_config")
    return cfg.image_encoder


def _grid_of(height: int, width: int, cfg: NLDConfig) -> tuple[int, int]:
    cell = image_encoder_of(cfg).cell
    if height <= 0 or width <= 0 or height % cell or width % cell:
        raise ValueError(f"preprocessed image size {height}x{width} must be positive multiples of {cell}")
    return height // cell, width // cell


def num_image_tokens(height: int, width: int, cfg: NLDConfig) -> int:
    """Prompt tokens of one preprocessed ``height x width`` image: ``1 + rows * (cols + 1)``."""
    rows, cols = _grid_of(height, width, cfg)
    return 1 + rows * (cols + 1)


def image_token_ids(height: int, width: int, cfg: NLDConfig) -> list[int]:
    """Marker ids standing for one preprocessed ``height x width`` image (layout in the module docstring)."""
    start, pad, brk, end = cfg.special.require("image_start", "image_pad", "image_break", "image_end")
    rows, cols = _grid_of(height, width, cfg)
    ids = [start, *([pad] * cols + [brk]) * rows]
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
