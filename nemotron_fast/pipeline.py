"""The endpoint in a box: the hosted API's input schema in, its output schema (``output``, ``usage``,
``timings``) out. Used by the CLI, the server and Python users. An opt-in ``mode`` input beyond the schema
(``"diffusion"`` by default, ``"ar"``, ``"linear_spec"``) picks the decoding mode; ``usage.num_function_evals``
is that mode's NFE (upstream's convention per mode, see :class:`~nemotron_fast.sampling.GenerationResult`).

Phases are timed as the endpoint reports them: ``image_validation_time`` (fetch, decode, validate the image),
``preprocessing_time`` (chat template, tokenisation, image tensors), ``gpu_transfer_time`` (host-to-device
copies), ``generation_time`` (vision tower, prefill, denoise, commits), ``decode_time`` (ids to text).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import Cancelled, InputValidationError
from .params import RequestParams, validate_inputs
from .sampling import GenerationResult, SamplingPolicy, StepEvent

__all__ = ["Pipeline", "Prepared", "default_model_path"]

Sampler = Literal["fast", "reference"]


def default_model_path() -> Path:
    """The embedded default model: the demo checkpoint trained here and shipped in the package
    (``nemotron_fast/demo/assets/model``). Raises :class:`FileNotFoundError` naming what is missing."""
    from .demo import default_model_path as demo_path

    return demo_path()


class Pipeline:
    """Loaded model + processor + sampler. Thread-compatible (one generation at a time per instance)."""

    def __init__(self, model: Any, *, sampler: Sampler = "fast", policy: SamplingPolicy | None = None,
                 fetch_timeout: float = 10.0, max_image_bytes: int = 20 * 2**20,
                 max_image_pixels: int = 50_000_000, enable_thinking: bool = False,
                 max_image_size: int | None = None) -> None:
        """``fetch_timeout`` (s), ``max_image_bytes`` and ``max_image_pixels`` bound every image input.
        ``enable_thinking`` ends the prompt with ``<think>\\n`` instead of ``<think></think>``; ``max_image_size``
        caps each image's longest side before preprocessing (default: the checkpoint's, 1400)."""
        if sampler not in ("fast", "reference"):
            raise ValueError(f"sampler must be 'fast' or 'reference', got {sampler!r}")
        self.model = model
        self.processor = model.processor
        self.sampler = sampler
        self.policy = policy or SamplingPolicy()
        self.image_limits = {"timeout": fetch_timeout, "max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self.prompt_options = {"enable_thinking": bool(enable_thinking), "max_image_size": max_image_size}

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, sampler: Sampler = "fast",
                        policy: SamplingPolicy | None = None, **limits: Any) -> Pipeline:
        """Load a checkpoint directory (``None`` = the embedded default model); ``limits`` go to ``__init__``."""
        from .model import load

        return cls(load(path if path is not None else default_model_path(), device=device, dtype=dtype),
                   sampler=sampler, policy=policy, **limits)

    # ---- schema ---------------------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """The model's context length (``max_position_embeddings``): prompt plus padded completion must fit."""
        return int(self.model.config.text.max_position_embeddings)

    def validate(self, inputs: dict[str, Any]) -> RequestParams:
        """Apply the schema's rules, with ``max_tokens`` and ``block_length`` bounded by the model's context
        length, without any I/O; raises :class:`InputValidationError`."""
        return validate_inputs(inputs, max_context=self.max_context)

    def _generate(self, input_ids: Any, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
                  p: RequestParams, policy: SamplingPolicy,
                  callback: Callable[[int, list[list[int]]], bool | None] | None,
                  on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
        kw: dict[str, Any] = dict(max_new_tokens=p.max_tokens, steps=p.steps, block_length=p.block_length,
                                  threshold=p.threshold, mode=p.mode)
        if p.mode == "linear_spec":
            # the endpoint cuts every completion to max_tokens; upstream's self-speculation can overshoot it
            policy = dataclasses.replace(policy, truncate_overshoot=True)
        if self.sampler == "reference":
            from .reference import generate as ref_generate

            if isinstance(input_ids, list):
                if len(input_ids) != 1:
                    raise ValueError("the reference sampler runs one request at a time")
                input_ids = torch.as_tensor(input_ids[0]).view(1, -1)
            return ref_generate(self.model, input_ids, pixel_values, image_sizes, policy=policy, **kw)
        from .generate import generate

        if on_step is not None:
            kw["on_step"] = on_step  # only when asked: ordinary requests call the sampler exactly as before
        return generate(self.model, input_ids, pixel_values, image_sizes, policy=policy, callback=callback, **kw)

    # ---- one request ------------------------------------------------------------------------------------------
    def _prepare(self, inputs: dict[str, Any], allow_private_urls: bool,
                 allow_local_files: bool) -> tuple[RequestParams, Any, dict]:
        from .processing import load_image

        p = self.validate(inputs)
        t0 = time.perf_counter()
        image = load_image(p.image_url, allow_private=allow_private_urls, allow_local_files=allow_local_files,
                           **self.image_limits)
        t1 = time.perf_counter()
        if not self.model.config.is_vlm:
            raise InputValidationError.single("image_url", "this checkpoint is a text model and takes no image")
        proc = self.processor.build_inputs(p.prompt, [image], **self.prompt_options)
        needed = proc.num_prompt_tokens + p.num_blocks * p.block_length
        if needed > self.max_context:
            raise InputValidationError.single(
                "max_tokens", f"the prompt ({proc.num_prompt_tokens} tokens, image included) plus the completion in "
                f"whole blocks ({p.num_blocks} x {p.block_length}) needs {needed} positions, more than the model's "
                f"context length of {self.max_context}", "value_error", p.max_tokens)
        t2 = time.perf_counter()
        return p, proc, {"image_validation_time": t1 - t0, "preprocessing_time": t2 - t1}

    def run(self, inputs: dict[str, Any], *, on_progress: Callable[[str], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, allow_private_urls: bool = False,
            allow_local_files: bool = False, log: Callable[[str], None] | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run one request. ``on_progress(text_so_far)`` is called after each committed block;
        ``should_cancel()`` is polled after each block and raises :class:`Cancelled` when it returns True.

        The image input is untrusted by default: a URL whose host resolves to a private, loopback, link-local or
        reserved address is refused unless ``allow_private_urls``, and a local path unless ``allow_local_files``.

        ``on_step`` (opt-in, for a live view) gets one JSON-ready dict per denoise step and per commit (see
        :meth:`step_record`); only the diffusion mode of the fast sampler has steps, other runs never call it."""
        t_start = time.perf_counter()
        p, proc, timings = self._prepare(inputs, allow_private_urls, allow_local_files)
        if log:
            log(f"prompt: {proc.num_prompt_tokens} tokens; " + (
                f"{p.num_blocks} blocks of {p.block_length}, {p.steps_per_block} steps each" if p.mode == "diffusion"
                else f"mode {p.mode}, up to {p.max_tokens} tokens"))
        t0 = time.perf_counter()
        dev = self.model.device
        ids = proc.input_ids.to(dev)
        pix = proc.pixel_values.to(dev, self.model.dtype) if proc.pixel_values is not None else None
        sizes = proc.image_sizes.to(dev) if proc.image_sizes is not None else None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings["gpu_transfer_time"] = time.perf_counter() - t0
        cancelled = False

        def callback(block: int, completions: list[list[int]]) -> bool:
            nonlocal cancelled
            if on_progress is not None:
                on_progress(self.processor.decode(completions[0]))
            if log:
                log(f"block {block + 1}/{p.num_blocks} committed" if p.mode == "diffusion"
                    else f"{len(completions[0])} tokens")
            if should_cancel is not None and should_cancel():
                cancelled = True
                return False
            return True

        steps = None
        if on_step is not None and p.mode == "diffusion" and self.sampler == "fast":
            steps = lambda event: on_step(self.step_record(event, p.block_length))  # noqa: E731
        t1 = time.perf_counter()
        result = self._generate(ids, pix, sizes, p, self.policy, callback, steps)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings["generation_time"] = time.perf_counter() - t1
        if cancelled:
            raise Cancelled("request was cancelled")
        t2 = time.perf_counter()
        text = self.processor.decode(result.completion_ids[0])
        timings["decode_time"] = time.perf_counter() - t2
        timings["total_time"] = time.perf_counter() - t_start
        return _output(text, proc.num_prompt_tokens, result.completion_ids[0], result.nfe, timings)

    def step_record(self, event: StepEvent, block_length: int) -> dict[str, Any]:
        """One :class:`StepEvent` of a single-row run as JSON: ``kind``, ``block``, ``step``, ``forwards`` (NFE
        so far), ``block_length``, and ``slots``: ``[offset in the block, token id, its text, confidence]`` for
        each position the step revealed (a commit: every position of the block, confidence ``None``). A token
        that decodes to nothing (EOS, a special token) has the text ``""``."""
        if event.kind == "commit":
            positions = list(range(len(event.tokens[0])))
            confidence: list[float | None] = [None] * len(positions)
        else:
            positions = list(event.revealed[0])
            confidence = [round(float(c), 4) for c in event.confidence[0]]
        tokens = [int(t) for t in event.tokens[0]]
        return {"kind": event.kind, "block": event.block, "step": event.step, "forwards": event.forwards,
                "block_length": block_length,
                "slots": [[i, t, self.processor.decode([t]), c] for i, t, c in zip(positions, tokens, confidence)]}

    # ---- the serving engine ------------------------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Any], *, allow_private_urls: bool = False,
                allow_local_files: bool = False) -> Prepared:
        """Validate, fetch and preprocess one request without touching the model (safe on any thread): the
        input half of :meth:`run`, for :class:`~nemotron_fast.engine.Engine` users such as the server."""
        p, proc, timings = self._prepare(inputs, allow_private_urls, allow_local_files)
        return Prepared(p, proc, timings, time.perf_counter())

    def engine_request(self, prep: Prepared, request_id: str, *, solo: bool = False) -> Any:
        """The :class:`~nemotron_fast.engine.EngineRequest` of a prepared request (tensors moved to the model's
        device and dtype)."""
        from .engine import EngineRequest

        if self.sampler != "fast":
            raise ValueError("the engine runs the fast sampler; use run() for the reference sampler")
        p, proc, dev = prep.params, prep.proc, self.model.device
        t0 = time.perf_counter()
        pix = proc.pixel_values.to(dev, self.model.dtype) if proc.pixel_values is not None else None
        sizes = proc.image_sizes.to(dev) if proc.image_sizes is not None else None
        prep.timings["gpu_transfer_time"] = time.perf_counter() - t0
        steps = p.steps if p.mode == "diffusion" else None
        return EngineRequest(proc.input_ids[0], p.max_tokens, p.block_length, steps, p.threshold, mode=p.mode,
                             pixel_values=pix, image_sizes=sizes, request_id=request_id, solo=solo)

    def engine_output(self, prep: Prepared, token_ids: list[int], nfe: int, generation_time: float) -> dict[str, Any]:
        """The endpoint's output for a request the engine finished: the completion cut to ``max_tokens`` (the
        endpoint's rule; self-speculation can overshoot), decoded, with its usage and timings."""
        completion = token_ids[:prep.params.max_tokens]
        t0 = time.perf_counter()
        text = self.processor.decode(completion)
        timings = dict(prep.timings, generation_time=generation_time, decode_time=time.perf_counter() - t0)
        timings["total_time"] = time.perf_counter() - prep.started + timings["image_validation_time"] + \
            timings["preprocessing_time"]
        return _output(text, prep.proc.num_prompt_tokens, completion, nfe, timings)

    # ---- many requests ------------------------------------------------------------------------------------------
    def run_batch(self, inputs: list[dict[str, Any]], *, allow_private_urls: bool = False,
                  allow_local_files: bool = False,
                  should_cancel: list[Callable[[], bool]] | None = None) -> list[dict[str, Any] | Exception]:
        """Run several requests as batched generations (rows grouped by equal parameters, ``per_row_eos`` so each
        row's result equals running it alone). A row's error is returned in its slot, never raised. Image inputs
        are checked as in :meth:`run`."""
        out: list[dict[str, Any] | Exception] = [RuntimeError("not run")] * len(inputs)
        prepared: dict[tuple, list[tuple[int, RequestParams, Any, dict, float]]] = {}
        for i, inp in enumerate(inputs):
            t_start = time.perf_counter()
            try:
                p, proc, timings = self._prepare(inp, allow_private_urls, allow_local_files)
            except Exception as exc:  # each row's failure is that row's answer
                out[i] = exc
                continue
            prepared.setdefault(p.batch_key(), []).append((i, p, proc, timings, t_start))
        if self.sampler == "reference":
            groups = [[row] for rows in prepared.values() for row in rows]
        else:
            groups = list(prepared.values())
        for rows in groups:
            self._run_group(rows, out, should_cancel)
        return out

    def _run_group(self, rows: list, out: list, should_cancel: list[Callable[[], bool]] | None) -> None:
        dev = self.model.device
        p = rows[0][1]
        t0 = time.perf_counter()
        ids = [proc.input_ids[0] for _, _, proc, _, _ in rows]
        pix_list = [proc.pixel_values for _, _, proc, _, _ in rows if proc.pixel_values is not None]
        pix, sizes = None, None
        if pix_list:
            h = max(x.shape[-2] for x in pix_list)
            w = max(x.shape[-1] for x in pix_list)
            pix = torch.cat([torch.nn.functional.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2])) for x in pix_list])
            pix = pix.to(dev, self.model.dtype)
            sizes = torch.cat([proc.image_sizes for _, _, proc, _, _ in rows if proc.image_sizes is not None]).to(dev)
        transfer = time.perf_counter() - t0
        policy = dataclasses.replace(self.policy, per_row_eos=True)

        def all_cancelled(block: int, completions: list[list[int]]) -> bool:
            # the group stops at the next block once every one of its rows is cancelled
            return should_cancel is None or not all(should_cancel[i]() for i, *_ in rows)

        t1 = time.perf_counter()
        try:
            result = self._generate(ids if len(ids) > 1 else ids[0].view(1, -1), pix, sizes, p,
                                    policy if len(rows) > 1 else self.policy, all_cancelled)
        except Exception as exc:
            for i, *_ in rows:
                out[i] = exc
            return
        gen_time = time.perf_counter() - t1
        for r, (i, _, proc, timings, t_start) in enumerate(rows):
            if should_cancel is not None and should_cancel[i]():
                out[i] = Cancelled("request was cancelled")
                continue
            t2 = time.perf_counter()
            text = self.processor.decode(result.completion_ids[r])
            timings = dict(timings, gpu_transfer_time=transfer, generation_time=gen_time,
                           decode_time=time.perf_counter() - t2)
            timings["total_time"] = time.perf_counter() - t_start
            nfe = result.row_nfe[r] if result.row_nfe else result.nfe
            out[i] = _output(text, proc.num_prompt_tokens, result.completion_ids[r], nfe, timings)


@dataclasses.dataclass
class Prepared:
    """A validated, fetched and preprocessed request (:meth:`Pipeline.prepare`): its parameters, the processor's
    output, the input phases' timings and when preparation finished (``time.perf_counter``)."""

    params: RequestParams
    proc: Any
    timings: dict[str, float]
    started: float


def _output(text: str, prompt_tokens: int, completion: list[int], nfe: int, timings: dict[str, float]) -> dict:
    keys = ("total_time", "image_validation_time", "preprocessing_time", "gpu_transfer_time", "generation_time",
            "decode_time")
    return {
        "output": text,
        "usage": {"prompt_tokens": int(prompt_tokens), "completion_tokens": len(completion),
                  "num_function_evals": int(nfe)},
        "timings": {k: float(timings.get(k, 0.0)) for k in keys},
    }
