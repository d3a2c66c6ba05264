"""Request inputs: loading images safely, Pixtral preprocessing, chat template, prompt ids and decoding."""

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
from .preprocess import image_token_ids, num_image_tokens, pad_and_stack, preprocess_image, resized_size, to_rgb
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
    "resized_size",
    "to_rgb",
    "Processor",
    "ProcessedInputs",
]
