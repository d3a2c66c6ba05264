"""What the reference and the fast sampler share: the result type, the policy object, the schedule arithmetic
and the injected randomness. Keeping these in one module is what makes "same tokens, same NFE" checkable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "MODES",
    "check_mode",
    "SamplingPolicy",
    "GenerationResult",
    "SpecStep",
    "StepEvent",
    "StepCallback",
    "Schedule",
    "resolve_schedule",
    "even_schedule",
    "NoiseSource",
]


#: The three decoding modes of the same weights (``spec/sampler.md``): block diffusion (upstream ``generate``),
#: autoregressive (``ar_generate``) and linear self-speculation (``linear_spec_generate``).
MODES = ("diffusion", "ar", "linear_spec")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming the choices."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class SamplingPolicy:
    """Opt-in departures from the upstream algorithm. All off = the reference algorithm exactly.

    - ``exclude_mask``: the MASK id can never be chosen by argmax (vLLM and SGLang do this).
    - ``finish_last_step``: on a block's last allowed step every remaining MASK is revealed, so no MASK reaches
      the output (vLLM).
    - ``per_row_eos``: each row stops at its own EOS, making every row's result identical to running it alone.
    - ``truncate_overshoot`` (linear_spec): cut the output to ``max_new_tokens``. Upstream's
      ``linear_spec_generate`` emits whole accepted runs and can overshoot by up to ``block_length - 1`` tokens
      (the MLX port truncates); the NFE is the same either way.
    """

    exclude_mask: bool = False
    finish_last_step: bool = False
    per_row_eos: bool = False
    truncate_overshoot: bool = False

    @property
    def is_reference(self) -> bool:
        return not (self.exclude_mask or self.finish_last_step or self.per_row_eos or self.truncate_overshoot)

    @property
    def name(self) -> str:
        on = [n for n in ("exclude_mask", "finish_last_step", "per_row_eos", "truncate_overshoot") if getattr(self, n)]
        return "+".join(on) if on else "reference"


@dataclass(frozen=True)
class SpecStep:
    """One linear_spec iteration of one row: the ``draft`` block the verify read (``[seed, drafted x (L-1)]``),
    the verify forward's choice at each of its ``L`` positions (``verify[i]`` is the token after ``draft[i]``),
    the ``accepted`` count (1 + the longest prefix with ``verify[i] == draft[i + 1]``; the row emitted
    ``verify[:accepted]``, cut at an EOS) and the draft forwards this iteration took (``draft_nfe``)."""

    draft: tuple[int, ...]
    verify: tuple[int, ...]
    accepted: int
    draft_nfe: int


@dataclass(frozen=True)
class StepEvent:
    """One forward of the diffusion loop, for an opt-in live view (``generate(..., on_step=...)``).

    ``kind`` is ``"denoise"`` (a denoise step: ``revealed[b]`` are the block offsets row ``b`` revealed, with
    their ``tokens[b]`` and ``confidence[b]``; rows that did not step have empty lists) or ``"commit"`` (the
    block's causal forward: ``tokens[b]`` is the whole finished block of row ``b``, ``revealed`` and
    ``confidence`` are empty). ``block`` is the block index, ``step`` the denoise step within it (for a commit,
    the number of denoise steps the block took) and ``forwards`` the forward passes so far, prefill excluded
    (the running NFE).
    """

    kind: str
    block: int
    step: int
    forwards: int
    revealed: list[list[int]]
    tokens: list[list[int]]
    confidence: list[list[float]]


#: Called with each :class:`StepEvent`; it runs on the sampler's thread and should return quickly.
StepCallback = Callable[[StepEvent], None]


@dataclass
class GenerationResult:
    """Output of a sampler.

    - ``completion_ids``: one list of token ids per row (prompt excluded), cut to ``max_new_tokens`` and, once
      every row has an EOS, trimmed to the longest row's first EOS + 1 (batch-coupled, as upstream); with
      ``per_row_eos`` each row is trimmed at its own first EOS + 1.
    - ``nfe``: forward passes after the prefill (denoise steps + commits), counted for the batch as upstream.
      ``row_nfe`` gives the per-row count (equal to ``nfe`` for every row unless ``per_row_eos``).
    - ``trace``: one entry per denoise forward: for each row, the sorted completion offsets revealed by that step.
    - ``timings``: seconds spent per phase (``vision``, ``prefill``, ``denoise``, ``select``, ``commit``), filled
      by samplers that measure them.
    - ``forwards``: the model forward passes this call actually ran, prefill included. It equals ``nfe + 1`` for
      diffusion (the prefill) and ``nfe`` for ``ar`` and ``linear_spec``, whose NFE already counts the prefill;
      anything more would be wasted work.
    - ``spec_trace`` (linear_spec only): one entry per verify iteration, per row the :class:`SpecStep` (``None``
      for a row that had already finished). ``acceptance`` reads the accepted counts out of it.

    The other modes count NFE as upstream does: ``ar`` one per generated token (the prefill's logit gives the
    first, the last one is never forwarded); ``linear_spec`` every forward including the prefill. ``trace`` is
    empty for both.
    """

    completion_ids: list[list[int]]
    nfe: int
    trace: list[list[list[int]]]
    row_nfe: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    spec_trace: list[list[SpecStep | None]] = field(default_factory=list)
    forwards: int = 0

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(r) for r in self.completion_ids)

    @property
    def acceptance(self) -> list[list[int]]:
        """Per linear_spec iteration, per row: tokens accepted (0 for a finished row)."""
        return [[s.accepted if s is not None else 0 for s in it] for it in self.spec_trace]


@dataclass(frozen=True)
class Schedule:
    """Block arithmetic of one call: ``num_blocks`` blocks of ``block_length``, ``steps_per_block`` steps each."""

    max_new_tokens: int
    block_length: int
    num_blocks: int
    steps_per_block: int

    @property
    def gen_length(self) -> int:
        return self.num_blocks * self.block_length


def resolve_schedule(max_new_tokens: int, block_length: int, steps: int | None) -> Schedule:
    """Validate the call's numbers and derive the block schedule.

    ``num_blocks = ceil(max_new_tokens / block_length)``; ``steps=None`` is the text call shape (spb =
    block_length); otherwise ``steps`` must be a positive multiple of ``num_blocks``.
    """
    for name, v in (("max_new_tokens", max_new_tokens), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    num_blocks = math.ceil(max_new_tokens / block_length)
    if steps is None:
        spb = block_length
    else:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if steps < num_blocks or steps % num_blocks:
            raise ValueError(f"steps ({steps}) must be >= and divisible by the number of blocks ({num_blocks} = "
                             f"ceil({max_new_tokens} / {block_length}))")
        spb = steps // num_blocks
    return Schedule(max_new_tokens, block_length, num_blocks, spb)


def even_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens to reveal at each of ``steps`` steps for ``num_masked`` masks: base = n // s, the first n % s
    steps get one more (the LLaDA / upstream ``get_num_transfer_tokens`` rule)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base, rem = divmod(num_masked, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


class NoiseSource:
    """Seeded float64 uniform noise for Gumbel-max sampling at T > 0.

    Both samplers draw from one of these in the same order (prefill seed ``[B, V]``, each denoise step
    ``[B, L, V]``, each commit seed ``[B, V]``), so with the same ``seed`` they consume identical noise and
    their tokens can be compared exactly. The noise is drawn on the CPU (device-independent) and moved.
    """

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def uniform(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        u = torch.rand(shape, dtype=torch.float64, generator=self.generator)
        return u.to(device)


def gumbel_argmax(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """argmax of ``exp(l) / (-log u) ** T`` in float64: a sample from ``softmax(l / T)`` (upstream's form)."""
    perturbed = logits.to(torch.float64).exp() / (-torch.log(u)) ** temperature
    return perturbed.argmax(dim=-1)
