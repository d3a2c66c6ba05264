"""The text side of a request: chat template, prompt ids with image tokens, and decoding the completion.

:class:`Processor` owns the checkpoint's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, loaded
offline) and its preprocessing config. ``build_inputs`` renders the chat template, tokenises (control tokens
typed by the user stay plain text where transformers supports it), and expands each ``[IMG]`` placeholder the
template wrote into that image's token layout; ``decode`` turns completion ids into the answer text.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import NLDConfig
from ..errors import ConfigError, ImageError, InputValidationError
from .preprocess import image_token_ids, pad_and_stack, preprocess_image

__all__ = ["Processor", "ProcessedInputs"]


@dataclass
class ProcessedInputs:
    """Model inputs for one prompt.

    ``input_ids``: int64 ``[1, T]`` (image tokens already expanded). ``pixel_values``: float32
    ``[n, 3, H, W]`` (each image zero-padded at the bottom/right to the largest H and W) or None.
    ``image_sizes``: int64 ``[n, 2]`` (the unpadded ``(H, W)`` of each image) or None.
    ``num_prompt_tokens``: T.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    num_prompt_tokens: int


class Processor:
    """Tokenizer + chat template + image preprocessing of one checkpoint."""

    def __init__(self, tokenizer: Any, config: NLDConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("the tokenizer has no chat_template (expected in tokenizer_config.json)",
                              field="chat_template")
        self._sanitize = "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters
        self._tokenizer_size = len(tokenizer)
        # Ids decode() drops: every special/added control token the tokenizer knows, plus the MASK.
        self._skip_ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
        self._skip_ids.update(int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._skip_ids.add(config.mask_token_id)
        self._eos = frozenset(config.eos_token_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: NLDConfig) -> Processor:
        """Load the tokenizer files in checkpoint directory ``path`` (offline; nothing is downloaded)."""
        from transformers import PreTrainedTokenizerFast

        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise ConfigError("tokenizer.json not found in the checkpoint directory", path=str(root))
        try:
            # The generic fast class reads tokenizer.json directly; AutoTokenizer would also parse config.json,
            # whose model_type transformers does not know.
            tok = PreTrainedTokenizerFast.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not load the tokenizer: {exc}", path=str(root)) from exc
        return cls(tok, config)

    def chat_messages(self, prompt: str, num_images: int = 0, *, system: str | None = None
                      ) -> list[dict[str, Any]]:
        """The conversation sent to the chat template: optional system turn, one user turn (images first)."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        return messages

    def render(self, prompt: str, num_images: int = 0, *, system: str | None = None,
               enable_thinking: bool = False) -> str:
        """The chat-templated prompt as text, with one ``[IMG]`` placeholder per image (for logs and tests)."""
        return self.tokenizer.apply_chat_template(
            self.chat_messages(prompt, num_images, system=system), tokenize=False, add_generation_prompt=True,
            enable_thinking=enable_thinking)

    def encode_prompt(self, prompt: str, num_images: int = 0, *, system: str | None = None,
                      enable_thinking: bool = False) -> list[int]:
        """Prompt ids before image expansion (one image placeholder id per image)."""
        messages = self.chat_messages(prompt, num_images, system=system)
        kw: dict[str, Any] = {"sanitize_control_tokens": True} if self._sanitize else {}
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True, enable_thinking=enable_thinking, **kw)
        return [int(i) for i in out["input_ids"]]

    def build_inputs(self, prompt: str, images: list[Image.Image] | None = None, *, system: str | None = None,
                     enable_thinking: bool = False) -> ProcessedInputs:
        """Template, tokenise and preprocess one request.

        ``images`` are loaded PIL images (see :func:`nemotron_fast.processing.load_image`), placed before the
        prompt text in the user turn. Raises :class:`InputValidationError` for an empty prompt,
        :class:`ImageError` for images sent to a text-only checkpoint or a placeholder count that does not
        match the number of images.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputValidationError.single("prompt", "prompt must be a non-empty string")
        images = list(images or [])
        cfg = self.config
        if images and not cfg.is_vlm:
            raise ImageError("this checkpoint is a text-only model and cannot take images", "image_not_supported")
        if images and cfg.preprocessor is None:
            raise ConfigError("a VLM checkpoint needs preprocessor_config.json to take images",
                              field="preprocessor_config.json")
        ids = self.encode_prompt(prompt, len(images), system=system, enable_thinking=enable_thinking)
        if not cfg.is_vlm:
            return _text_only(ids)
        placeholder = cfg.image_token_id
        positions = [i for i, t in enumerate(ids) if t == placeholder]
        if len(positions) != len(images):
            raise ImageError(f"the prompt has {len(positions)} image placeholders but {len(images)} images were given",
                             "image_count_mismatch")
        if not images:
            return _text_only(ids)
        assert cfg.preprocessor is not None
        pixels: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        for img in images:
            pv, hw = preprocess_image(img, cfg.preprocessor, cfg.spatial_merge_size)
            pixels.append(pv)
            sizes.append(hw)
        expanded: list[int] = []
        start = 0
        for pos, (h, w) in zip(positions, sizes):
            expanded.extend(ids[start:pos])
            expanded.extend(image_token_ids(h, w, cfg))
            start = pos + 1
        expanded.extend(ids[start:])
        return ProcessedInputs(
            input_ids=torch.tensor([expanded], dtype=torch.long),
            pixel_values=pad_and_stack(pixels),
            image_sizes=torch.tensor(sizes, dtype=torch.long),
            num_prompt_tokens=len(expanded),
        )

    def truncate_at_eos(self, ids: list[int]) -> list[int]:
        """``ids`` up to (not including) the first id in ``config.eos_token_ids``."""
        for i, t in enumerate(ids):
            if t in self._eos:
                return ids[:i]
        return ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Completion ids to text: cut at the first EOS, drop special tokens, the MASK id and out-of-vocab ids."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D ids), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        kept = [int(t) for t in self.truncate_at_eos([int(t) for t in ids])
                if t not in self._skip_ids and 0 <= t < self._tokenizer_size]
        return self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _text_only(ids: list[int]) -> ProcessedInputs:
    return ProcessedInputs(input_ids=torch.tensor([ids], dtype=torch.long), pixel_values=None, image_sizes=None,
                           num_prompt_tokens=len(ids))
