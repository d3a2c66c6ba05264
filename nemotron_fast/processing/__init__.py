"""Request inputs: loading images safely, the VLM image encoder, ChatML prompts with image markers, decoding."""

from .images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    FetchedBytes,
    decode_image_bytes,
    fetch_url_bytes,
    load_image,
    parse_data_uri,
)
from .preprocess import image_grid, image_token_ids, num_image_tokens, pad_and_stack, preprocess_image
from .text import ProcessedInputs, Processor

__all__ = [
    "load_image",
    "fetch_url_bytes",
    "decode_image_bytes",
    "parse_data_uri",
    "FetchedBytes",
    "SUPPORTED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "preprocess_image",
    "image_token_ids",
    "num_image_tokens",
    "pad_and_stack",
    "image_grid",
    "Processor",
    "ProcessedInputs",
]
