"""A pipeline with the real ``Pipeline``'s interface and deterministic, controllable behaviour.

Used for the server's own semantics (queueing, cancel timing, batching, restarts) where the real model's speed
would make timing untestable; the acceptance tests run the real pipeline.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nemotron_fast import errors
from nemotron_fast.server.worker import Cancelled


class FakePipeline:
    """``output`` is ``"echo: <prompt>"`` cut to ``max_tokens`` characters, produced one block at a time."""

    def __init__(self, block_delay: float = 0.0) -> None:
        self.block_delay = block_delay
        self.batches: list[int] = []
        self.started: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def validate(self, inputs: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for name in ("image_url", "prompt"):
            if not isinstance(inputs.get(name), str) or not inputs[name]:
                problems.append({"loc": ["body", name], "msg": "Field required", "type": "missing"})
        max_tokens = int(inputs.get("max_tokens", 512))
        block = int(inputs.get("block_length", 32))
        blocks = math.ceil(max_tokens / block)
        steps = inputs.get("num_inference_steps")
        if steps is not None and (steps < blocks or steps % blocks):
            problems.append({"loc": ["body", "num_inference_steps"], "type": "value_error",
                             "msg": f"num_inference_steps={steps} must be a multiple of num_blocks={blocks}"})
        if problems:
            raise errors.InputValidationError(problems)
        return {"max_tokens": max_tokens, "block_length": block, "num_blocks": blocks}

    def _image(self, url: str, allow_private: bool, allow_local: bool) -> bytes:
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except Exception as exc:
                raise errors.ImageError(f"bad data URI: {exc}") from exc
        if url.startswith(("http://", "https://")):
            host = urlsplit(url).hostname or ""
            if host in ("127.0.0.1", "localhost") and not allow_private:
                raise errors.ImageError("refusing a loopback address")
            import httpx

            return httpx.get(url, timeout=5).content
        if not allow_local:
            raise errors.ImageError("reading local files is not allowed")
        path = Path(url)
        if not path.exists():
            raise errors.ImageError(f"no such file {url}")
        return path.read_bytes()

    def run(self, inputs: dict[str, Any], *, on_progress: Callable[[str], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, allow_private_urls: bool = False,
            allow_local_files: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        params = self.validate(inputs)
        self.started.append(inputs["prompt"])
        image = self._image(inputs["image_url"], allow_private_urls, allow_local_files)
        text = f"echo: {inputs['prompt']} [{len(image)}]"[: params["max_tokens"]]
        per_block = max(1, math.ceil(len(text) / params["num_blocks"]))
        if log is not None:
            log("fake pipeline running")
        out = ""
        for i in range(params["num_blocks"]):
            self.gate.wait()
            time.sleep(self.block_delay)
            out = text[: (i + 1) * per_block]
            if on_progress is not None:
                on_progress(out)
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled")
        return {"output": text, "usage": {"prompt_tokens": 7, "completion_tokens": len(text),
                                          "num_function_evals": 2 * params["num_blocks"]},
                "timings": {k: 0.0 for k in ("total_time", "image_validation_time", "preprocessing_time",
                                              "gpu_transfer_time", "generation_time", "decode_time")}}

    def run_batch(self, inputs: list[dict[str, Any]], *, allow_private_urls: bool = False,
                  allow_local_files: bool = False,
                  should_cancel: list[Callable[[], bool]] | None = None) -> list[dict[str, Any] | Exception]:
        self.batches.append(len(inputs))
        results: list[dict[str, Any] | Exception] = []
        for i, row in enumerate(inputs):
            try:
                results.append(self.run(row, allow_private_urls=allow_private_urls, allow_local_files=allow_local_files,
                                        should_cancel=should_cancel[i] if should_cancel else None))
            except Exception as exc:
                results.append(exc)
        return results
