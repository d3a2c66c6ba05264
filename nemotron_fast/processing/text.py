"""The text side of a request: ChatML prompt with image markers, prompt ids, and decoding the completion.

:class:`Processor` owns the checkpoint's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, loaded
offline) and builds a VLM request the way upstream's ``process_messages`` does:

1. render the conversation as ChatML (no BOS): an optional ``<|im_start|>system\n...<|im_end|>\n`` turn, the
   user turn ``<|im_start|>user\n{images}{text}<|im_end|>\n`` with one ``<|image_start|>`` placeholder per image
   before the text, and the generation prompt ``<|im_start|>assistant\n`` followed by ``<think></think>``
   (thinking off, the default) or ``<think>\n`` (thinking on). The checkpoint's chat template renders this when
   it behaves like upstream's (checked once, on probe conversations); otherwise the text is built directly;
2. tokenise the text with the tokenizer's own defaults (``tokenizer(text)``: a BOS only if the tokenizer adds
   one);
3. replace each placeholder by the image's marker run (``<|image_start|>``, rows of ``<|image_pad|>`` closed by
   ``<|image_break|>``, the last by ``<|image_end|>``; see :mod:`.preprocess`). The markers are atomic added
   tokens, so this equals tokenising upstream's expanded text.

Prompt and system text may not contain a control token's string (a ChatML or image marker, BOS/EOS, MASK):
upstream would tokenise it as that token, which breaks the prompt's structure, so such a request is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from ..config import NLDConfig
from ..errors import ConfigError, ImageError, InputValidationError
from .preprocess import image_encoder_of, image_token_ids, pad_and_stack, preprocess_image

__all__ = ["Processor", "ProcessedInputs", "chatml_prompt"]


@dataclass
class ProcessedInputs:
    """Model inputs for one prompt.

    ``input_ids``: int64 ``[1, T]`` (image markers already expanded). ``pixel_values``: float32
    ``[n, 3, H, W]`` (each image zero-padded at the bottom/right to the largest H and W) or None.
    ``image_sizes``: int64 ``[n, 2]`` (the unpadded ``(H, W)`` of each image) or None.
    ``num_prompt_tokens``: T.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    num_prompt_tokens: int


def chatml_prompt(prompt: str, num_images: int = 0, *, system: str | None = None, enable_thinking: bool = False,
                  image_placeholder: str = "<|image_start|>") -> str:
    """The ChatML text upstream renders for one user turn (see the module docstring, step 1)."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    text += f"<|im_start|>user\n{image_placeholder * num_images}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text + ("<think>\n" if enable_thinking else "<think></think>")


# Conversations on which a checkpoint's chat template must render exactly chatml_prompt's text to be used.
_PROBES: tuple[tuple[str, int, str | None, bool], ...] = (
    ("Describe the image.", 1, None, False), ("Two images?", 2, "Be brief.", True), ("No image", 0, None, False))


class Processor:
    """Tokenizer + ChatML prompt + image encoder of one checkpoint."""

    def __init__(self, tokenizer: Any, config: NLDConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self._tokenizer_size = len(tokenizer)
        self.prompt_source: Literal["chat_template", "chatml"] = "chatml"
        if getattr(tokenizer, "chat_template", None) is not None and all(
                self._render_with_template(p, n, s, t) == chatml_prompt(p, n, system=s, enable_thinking=t)
                for p, n, s, t in _PROBES):
            self.prompt_source = "chat_template"
        # Ids decode() drops: every special/added control token the tokenizer knows, plus the MASK.
        self._skip_ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
        self._skip_ids.update(int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._skip_ids.add(config.mask_token_id)
        self._eos = frozenset(config.eos_token_ids)
        # Strings a user may not type: control tokens (special added tokens) and the ChatML / image markers.
        control = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        control.update(config.special.token_text(a) for a in ("image_start", "image_pad", "image_break",
                                                                "image_end", "im_start", "im_end"))
        self._control_re = re.compile("|".join(re.escape(c) for c in sorted(control, key=len, reverse=True)))

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

    @staticmethod
    def chat_messages(prompt: str, num_images: int = 0, *, system: str | None = None) -> list[dict[str, Any]]:
        """The conversation sent to a chat template: optional system turn, one user turn (images first)."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        return messages

    def _render_with_template(self, prompt: str, num_images: int, system: str | None, enable_thinking: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                self.chat_messages(prompt, num_images, system=system), tokenize=False, add_generation_prompt=True,
                enable_thinking=enable_thinking)
        except Exception:  # a template that cannot render the probe is not used  # noqa: BLE001
            return ""

    def render(self, prompt: str, num_images: int = 0, *, system: str | None = None,
               enable_thinking: bool = False) -> str:
        """The prompt as text, with one ``<|image_start|>`` placeholder per image (for logs and tests)."""
        if self.prompt_source == "chat_template":
            return self._render_with_template(prompt, num_images, system, enable_thinking)
        return chatml_prompt(prompt, num_images, system=system, enable_thinking=enable_thinking)

    def _check_texts(self, prompt: str, system: str | None) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputValidationError.single("prompt", "prompt must be a non-empty string")
        self._check_text("prompt", prompt)
        if system is not None:
            self._check_text("system", system)

    def _check_text(self, field: str, text: str) -> None:
        found = self._control_re.search(text)
        if found:
            raise InputValidationError.single(
                field, f"{field} contains the control token {found.group()!r}, which would change the prompt's "
                "structure")

    def prompt_ids(self, prompt: str, image_sizes: list[tuple[int, int]] | None = None, *,
                   system: str | None = None, enable_thinking: bool = False) -> list[int]:
        """Prompt ids with the markers of images of preprocessed sizes ``image_sizes`` ``[(H, W), ...]``
        expanded (steps 1-3 of the module docstring)."""
        self._check_texts(prompt, system)
        sizes = list(image_sizes or [])
        text = self.render(prompt, len(sizes), system=system, enable_thinking=enable_thinking)
        ids = [int(i) for i in self.tokenizer(text)["input_ids"]]
        if not sizes:
            return ids
        (start,) = self.config.special.require("image_start")
        positions = [i for i, t in enumerate(ids) if t == start]
        if len(positions) != len(sizes):
            raise ImageError(f"the prompt has {len(positions)} image placeholders but {len(sizes)} images were given",
                             "image_count_mismatch")
        expanded: list[int] = []
        prev = 0
        for pos, (h, w) in zip(positions, sizes):
            expanded.extend(ids[prev:pos])
            expanded.extend(image_token_ids(h, w, self.config))
            prev = pos + 1
        expanded.extend(ids[prev:])
        return expanded

    def build_inputs(self, prompt: str, images: list[Image.Image] | None = None, *, system: str | None = None,
                     enable_thinking: bool = False, max_image_size: int | None = None) -> ProcessedInputs:
        """Prompt ids and image tensors for one request.

        ``images`` are loaded PIL images (see :func:`nemotron_fast.processing.load_image`), placed before the
        prompt text in the user turn. ``max_image_size`` caps each image's longest side before it is cut into
        28-pixel cells (default: the checkpoint's, 1400). Raises :class:`InputValidationError` for an empty
        prompt or one holding a control token, :class:`ImageError` for images sent to a text-only checkpoint.
        """
        self._check_texts(prompt, system)
        images = list(images or [])
        if images and not self.config.is_vlm:
            raise ImageError("this checkpoint is a text-only model and cannot take images", "image_not_supported")
        if max_image_size is not None and (isinstance(max_image_size, bool) or not isinstance(max_image_size, int)
                                           or max_image_size < 1):
            raise InputValidationError.single("max_image_size", "max_image_size must be a positive integer")
        pixels: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        for img in images:
            pv, hw = preprocess_image(img, image_encoder_of(self.config), max_image_size)
            pixels.append(pv)
            sizes.append(hw)
        ids = self.prompt_ids(prompt, sizes, system=system, enable_thinking=enable_thinking)
        return ProcessedInputs(
            input_ids=torch.tensor([ids], dtype=torch.long),
            pixel_values=pad_and_stack(pixels) if pixels else None,
            image_sizes=torch.tensor(sizes, dtype=torch.long) if sizes else None,
            num_prompt_tokens=len(ids),
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
