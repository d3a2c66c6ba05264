"""Training examples and batches for the demo model.

An example is one scene with one task (its description, or one of its questions), rendered through the
checkpoint's own :class:`~nemotron_fast.processing.Processor` (ChatML prompt, image-marker expansion, the
mistral-common image encoder), so training sees exactly the prompts inference builds. The answer is the
tokenised text followed by the EOS id.

A batch packs two streams per row into one sequence of ``Tc + L`` tokens:

- the clean stream ``prompt + answer`` (right-padded to ``Tc``), causal; AR targets are the answer tokens;
- one noisy copy of an answer block (``L`` tokens, aligned to the answer start): position 0 is the clean AR seed
  token (never masked: decoding always fills it from the previous logits), the other positions are MASK with a
  per-row rate ``t ~ U(0, 1)`` (at least one). The block attends bidirectionally to itself and to the clean
  tokens before the block start (the prompt and earlier clean blocks), with the block's own positions. Past
  the answer's EOS the block target is EOS, as a completion padded with EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..processing import preprocess_image
from ..processing.preprocess import image_encoder_of
from .scenes import CELL, COLOURS, DESCRIBE_PROMPTS, GRID, SHAPES, Scene, make_scene, scene_seed

# Questions that need a relation (left/right) or a filtered count are drawn more often: they learn slowest.
KIND_WEIGHTS: dict[str, float] = {"left_of": 3.0, "right_of": 3.0, "count_shape": 2.0, "colour_of": 2.0}

__all__ = ["KIND_WEIGHTS", "Example", "Batch", "ExampleMaker", "collate", "cell_labels", "NUM_CELL_CLASSES"]


@dataclass
class Example:
    """One training example: ``prompt_ids`` (image tokens expanded), ``answer_ids`` (ending with EOS), the
    preprocessed image ``pixel_values`` float32 [3, H, W] and ``cell_labels``: per image token (grid cell,
    row-major) its content and its neighbours' (vision pre-training targets, see :func:`cell_labels`)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    pixel_values: torch.Tensor
    kind: str
    cell_labels: list[tuple[int, int, int]]


@dataclass
class Batch:
    """Packed model inputs (see the module docstring). B rows, T = Tc + L tokens.

    - ``input_ids`` int64 [B, T]; ``positions`` int64 [B, T]; ``attn_mask`` bool [B, 1, T, T] (True = attend)
    - ``pixel_values`` float32 [B, 3, H, W]; ``image_sizes`` int64 [B, 2]
    - ``ar_targets`` int64 [B, T]: the token each position predicts next, -100 where no AR loss
    - ``diff_targets`` int64 [B, T]: the clean token at each masked noisy position, -100 elsewhere
    - ``cell_labels`` int64 [B * cells, 3]: content and neighbour classes of every image token
      (see :func:`cell_labels`)
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    ar_targets: torch.Tensor
    diff_targets: torch.Tensor
    cell_labels: torch.Tensor


class ExampleMaker:
    """Builds examples through a checkpoint's :class:`~nemotron_fast.processing.Processor`.

    The prompt ids of a question depend only on the question and the image size, so they are cached; the
    image goes through the shared :func:`~nemotron_fast.processing.preprocess_image`. The result equals
    ``processor.build_inputs(question, [image])`` (tested).
    """

    def __init__(self, processor: Any, caption_prob: float = 0.3) -> None:
        self.processor = processor
        self.config = processor.config
        self.caption_prob = caption_prob
        self._prompts: dict[tuple[str, int, int], list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str, height: int, width: int) -> list[int]:
        """Chat-templated prompt ids for one ``height x width`` image followed by ``question``."""
        key = (question, height, width)
        if key not in self._prompts:
            self._prompts[key] = self.processor.prompt_ids(question, [(height, width)])
        return self._prompts[key]

    def answer_ids(self, answer: str) -> list[int]:
        """Answer token ids followed by the EOS id."""
        if answer not in self._answers:
            ids = self.processor.tokenizer.encode(answer, add_special_tokens=False)
            self._answers[answer] = [*ids, self.config.eos_token_id]
        return self._answers[answer]

    def __call__(self, seed: int, index: int, split: str = "train") -> Example:
        """Example ``index`` of run ``seed``: a fresh scene (``scene_seed(split, seed, index)``) and one task."""
        scene = make_scene(scene_seed(split, seed, index))
        rng = random.Random(f"task:{split}:{seed}:{index}")
        if rng.random() < self.caption_prob:
            question, answer, kind = rng.choice(DESCRIBE_PROMPTS), scene.caption, "caption"
        else:
            qa = rng.choices(scene.qa, weights=[KIND_WEIGHTS.get(q.kind, 1.0) for q in scene.qa])[0]
            question, answer, kind = qa.question, qa.answer, qa.kind
        pix, (h, w) = preprocess_image(scene.image, image_encoder_of(self.config))
        return Example(list(self.prompt_ids(question, h, w)), list(self.answer_ids(answer)), pix, kind,
                       cell_labels(scene))


def cell_labels(scene: Scene) -> list[tuple[int, int, int]]:
    """Per grid cell (= image token, row-major): ``(content, left, right)``. ``content`` is 0 for an empty cell,
    else ``1 + colour * len(SHAPES) + shape``; for a cell holding a shape, ``left`` / ``right`` are the content
    classes of its neighbours in left-to-right order (0: none), for an empty cell -100 (no target)."""
    colours = list(COLOURS)
    cls = [1 + colours.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape) for o in scene.objects]
    labels = [(0, -100, -100)] * (GRID * GRID)
    for i, o in enumerate(scene.objects):  # sorted left to right
        left = cls[i - 1] if i > 0 else 0
        right = cls[i + 1] if i + 1 < len(cls) else 0
        labels[(o.y // CELL) * GRID + o.x // CELL] = (cls[i], left, right)
    return labels


NUM_CELL_CLASSES = 1 + len(COLOURS) * len(SHAPES)


def collate(examples: list[Example], *, mask_id: int, eos_id: int, pad_id: int, block_length: int,
            generator: torch.Generator) -> Batch:
    """Pack ``examples`` into a :class:`Batch`; ``generator`` draws the block choice and the mask pattern."""
    b, length = len(examples), block_length
    tc = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    t = tc + length
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    positions = torch.zeros(b, t, dtype=torch.long)
    ar = torch.full((b, t), -100, dtype=torch.long)
    diff = torch.full((b, t), -100, dtype=torch.long)
    mask = torch.zeros(b, 1, t, t, dtype=torch.bool)
    causal = torch.ones(tc, tc, dtype=torch.bool).tril()
    # one draw per row for the block index, the mask rate and the mask pattern, in a fixed order
    u_block = torch.rand(b, generator=generator)
    u_rate = torch.rand(b, generator=generator)
    u_pos = torch.rand(b, length, generator=generator)
    for r, e in enumerate(examples):
        p, a = len(e.prompt_ids), len(e.answer_ids)
        clean = e.prompt_ids + e.answer_ids
        ids[r, : p + a] = torch.tensor(clean)
        positions[r, :tc] = torch.arange(tc)
        ar[r, p - 1 : p + a - 1] = torch.tensor(e.answer_ids)
        mask[r, 0, :tc, :tc] = causal
        n_blocks = -(-a // length)
        k = min(int(u_block[r] * n_blocks), n_blocks - 1)
        start = p + k * length
        target = (e.answer_ids[k * length:(k + 1) * length] + [eos_id] * length)[:length]
        masked = u_pos[r] < u_rate[r]
        masked[0] = False
        if not masked.any():
            masked[1 + int(u_pos[r, 1:].argmin())] = True
        noisy = torch.tensor(target)
        ids[r, tc:] = torch.where(masked, torch.full_like(noisy, mask_id), noisy)
        diff[r, tc:] = torch.where(masked, noisy, torch.full_like(noisy, -100))
        positions[r, tc:] = start + torch.arange(length)
        mask[r, 0, tc:, :start] = True
        mask[r, 0, tc:, tc:] = True
    pix = torch.stack([e.pixel_values for e in examples])
    sizes = torch.tensor([list(e.pixel_values.shape[1:]) for e in examples], dtype=torch.long)
    cells = torch.tensor([list(c) for e in examples for c in e.cell_labels], dtype=torch.long).view(-1, 3)
    return Batch(ids, positions, mask, pix, sizes, ar, diff, cells)
