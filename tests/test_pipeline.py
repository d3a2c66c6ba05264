"""The Pipeline: the endpoint's output schema, every parameter rule and every bad image as a clear error
(never a traceback or a hang), batching equal to single runs, progress and cancellation; and the CLI."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from nemotron_fast import Pipeline
from nemotron_fast.errors import Cancelled, ImageError, InputValidationError

OUTPUT_KEYS = {"output", "usage", "timings"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "num_function_evals"}
TIMING_KEYS = {"total_time", "image_validation_time", "preprocessing_time", "gpu_transfer_time", "generation_time",
               "decode_time"}


def _png_bytes(size=(60, 44), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _huge_png_header(w: int, h: int) -> bytes:
    """A PNG header claiming w x h pixels with no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def pipe(ckpt_factory) -> Pipeline:
    return Pipeline.from_pretrained(ckpt_factory(vlm=True, seed=31, head_scale=8.0), fetch_timeout=0.5,
                                    max_image_bytes=200_000, max_image_pixels=4_000_000)


@pytest.fixture(scope="module")
def png_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "ex.png"
    p.write_bytes(_png_bytes())
    return p


class _Slow(BaseHTTPRequestHandler):
    release = threading.Event()
    answered = False

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/slow":
            self.release.wait(30)
            _Slow.answered = True
        if self.path == "/missing":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = _png_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Slow.release.set()
    srv.shutdown()
    srv.server_close()


SMALL = {"prompt": "Describe the image.", "max_tokens": 40, "block_length": 16, "num_inference_steps": 12}


def test_output_schema_and_usage(pipe: Pipeline, png_path: Path) -> None:
    out = pipe.run({**SMALL, "image_url": str(png_path)}, allow_local_files=True)
    assert set(out) == OUTPUT_KEYS and set(out["usage"]) == USAGE_KEYS and set(out["timings"]) == TIMING_KEYS
    assert isinstance(out["output"], str)
    u, t = out["usage"], out["timings"]
    expected_prompt = pipe.processor.build_inputs(SMALL["prompt"], [Image.open(png_path)]).input_ids.shape[1]
    assert 1 <= u["completion_tokens"] <= 40 and u["prompt_tokens"] == expected_prompt
    # 3 blocks of 16 with 4 steps each: at least one commit per block, at most steps + commits
    assert 1 <= u["num_function_evals"] <= 3 * (4 + 1)
    assert all(v >= 0 for v in t.values())
    parts = sum(t[k] for k in TIMING_KEYS - {"total_time"})
    assert parts <= t["total_time"] + 1e-3
    json.dumps(out)


def test_fast_and_reference_pipelines_agree(pipe: Pipeline, png_path: Path) -> None:
    ref = Pipeline(pipe.model, sampler="reference")
    inputs = {**SMALL, "image_url": str(png_path), "threshold": 0.5}
    a, b = pipe.run(inputs, allow_local_files=True), ref.run(inputs, allow_local_files=True)
    assert a["output"] == b["output"] and a["usage"] == b["usage"]


@pytest.mark.parametrize("inputs,field", [
    ({"prompt": "x"}, "image_url"), ({"image_url": "a.png"}, "prompt"),
    ({"image_url": "a.png", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"image_url": "a.png", "prompt": "x", "threshold": 2}, "threshold"),
    ({"image_url": "a.png", "prompt": "x", "block_length": -1}, "block_length"),
    ({"image_url": "a.png", "prompt": "x", "num_inference_steps": 17}, "num_inference_steps"),
    ({"image_url": "a.png", "prompt": "x", "inference_steps": 16, "num_inference_steps": 32}, "inference_steps"),
])
def test_parameter_rules_before_any_io(pipe: Pipeline, inputs: dict, field: str) -> None:
    with pytest.raises(InputValidationError) as ei:
        pipe.run(inputs)
    assert ei.value.errors[0]["loc"] == ["body", field]


def _bad_images(tmp: Path, http: str) -> list[tuple[str, str]]:
    (tmp / "notimg.png").write_bytes(b"hello, not an image")
    (tmp / "trunc.png").write_bytes(_png_bytes((200, 200))[:300])
    (tmp / "huge.png").write_bytes(_huge_png_header(30000, 30000))
    (tmp / "big.bin").write_bytes(b"\0" * 300_000)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    return [
        (_data_uri(b"not an image"), "not an image"),
        (_data_uri(buf.getvalue(), "image/tiff"), "unsupported"),
        (str(tmp / "notimg.png"), "not an image"),
        (str(tmp / "trunc.png"), "truncated"),
        (str(tmp / "huge.png"), "pixels"),
        (str(tmp / "big.bin"), "large"),
        (str(tmp / "absent.png"), "not found"),
        ("data:image/png;base64,", "empty|no data"),
        ("data:image/png;base64,!!!", "base64"),
        (f"{http}/missing", "404"),
        (f"{http}/slow", "timed out"),
    ]


def test_every_bad_image_is_a_clear_error(pipe: Pipeline, tmp_path: Path, http: str) -> None:
    for source, words in _bad_images(tmp_path, http):
        with pytest.raises(ImageError) as ei:
            pipe.run({**SMALL, "image_url": source}, allow_private_urls=True, allow_local_files=True)
        err = ei.value.errors[0]
        assert err["loc"] == ["body", "image_url"]
        assert any(w.lower() in err["msg"].lower() for w in words.split("|")), (source, err["msg"])
    assert not _Slow.answered  # the slow URL failed on the fetch timeout, while its server was still holding it


def test_private_urls_and_local_paths_refused_unless_asked(pipe: Pipeline, http: str, png_path: Path) -> None:
    with pytest.raises(ImageError, match="non-public") as ei:
        pipe.run({**SMALL, "image_url": f"{http}/ok.png"})
    assert ei.value.errors[0]["type"] == "image_url_forbidden"
    for path in (str(png_path), png_path.as_posix(), "relative/x.png"):
        with pytest.raises(ImageError, match="local files") as ei:
            pipe.run({**SMALL, "image_url": path})
        assert ei.value.errors[0]["type"] == "image_local_file_forbidden"
    batch = pipe.run_batch([{**SMALL, "image_url": str(png_path)}, {**SMALL, "image_url": f"{http}/ok.png"}])
    assert [e.errors[0]["type"] for e in batch] == ["image_local_file_forbidden", "image_url_forbidden"]
    assert pipe.run({**SMALL, "image_url": f"{http}/ok.png"}, allow_private_urls=True)["usage"]["completion_tokens"]
    assert pipe.run({**SMALL, "image_url": str(png_path)}, allow_local_files=True)["usage"]["completion_tokens"]


def test_lengths_bounded_by_the_model_context(ckpt_factory, png_path: Path) -> None:
    p = Pipeline.from_pretrained(ckpt_factory(vlm=True, seed=31, max_position_embeddings=128))
    assert p.max_context == 128  # read from the checkpoint's config.json
    for field in ("max_tokens", "block_length"):
        with pytest.raises(InputValidationError) as ei:
            p.validate({**SMALL, "image_url": "x", field: 129, "num_inference_steps": None})
        err = ei.value.errors[0]
        assert err["loc"] == ["body", field] and err["type"] == "less_than_equal" and "context length is 128" in \
            err["msg"]
    assert p.validate({**SMALL, "image_url": "x", "max_tokens": 128, "block_length": 128}).max_tokens == 128
    # the prompt (image tokens included) plus the completion in whole blocks must fit the context too
    with pytest.raises(InputValidationError, match="context length of 128") as ei:
        p.run({**SMALL, "image_url": str(png_path), "max_tokens": 112, "block_length": 16,
               "num_inference_steps": 7}, allow_local_files=True)
    assert ei.value.errors[0]["loc"] == ["body", "max_tokens"]


def test_text_checkpoint_rejects_images(ckpt_factory, png_path: Path) -> None:
    p = Pipeline.from_pretrained(ckpt_factory(vlm=False, seed=1))
    with pytest.raises(InputValidationError, match="text model"):
        p.run({**SMALL, "image_url": str(png_path)}, allow_local_files=True)


def test_progress_and_cancel(pipe: Pipeline, png_path: Path) -> None:
    seen: list[str] = []
    pipe.run({**SMALL, "image_url": str(png_path)}, on_progress=seen.append, allow_local_files=True)
    assert 1 <= len(seen) <= 3
    calls = []
    with pytest.raises(Cancelled):
        pipe.run({**SMALL, "image_url": str(png_path)}, should_cancel=lambda: calls.append(1) or True,
                 allow_local_files=True)
    assert len(calls) == 1


def test_run_batch_equals_single_runs(pipe: Pipeline, png_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "b.png"
    other.write_bytes(_png_bytes((90, 30), "blue"))
    reqs = [{**SMALL, "image_url": str(png_path)}, {**SMALL, "image_url": str(other), "prompt": "What is it?"},
            {**SMALL, "image_url": str(other), "max_tokens": 0},
            {**SMALL, "image_url": str(png_path), "threshold": 0.3, "prompt": "Say something longer please."}]
    batch = pipe.run_batch(reqs, allow_local_files=True)
    assert isinstance(batch[2], InputValidationError)
    for i in (0, 1, 3):
        single = pipe.run(reqs[i], allow_local_files=True)
        assert batch[i]["output"] == single["output"] and batch[i]["usage"] == single["usage"], i


def test_cli_json_and_errors(ckpt_factory, png_path: Path) -> None:
    model = ckpt_factory(vlm=True, seed=31, head_scale=8.0)
    cmd = [sys.executable, "-m", "nemotron_fast.cli", "generate", "--model", str(model), "--image", str(png_path),
           "--prompt", "Describe the image.", "--max-tokens", "24", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == OUTPUT_KEYS and set(out["usage"]) == USAGE_KEYS and set(out["timings"]) == TIMING_KEYS
    bad = subprocess.run(cmd[:-3] + ["--steps", "5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "num_inference_steps" in bad.stderr and "Traceback" not in bad.stderr


def test_run_batch_stops_a_fully_cancelled_group_at_the_next_block(pipe: Pipeline, png_path: Path) -> None:
    calls: list[int] = []
    reqs = [{**SMALL, "image_url": str(png_path)}, {**SMALL, "image_url": str(png_path), "prompt": "Hi there."}]
    out = pipe.run_batch(reqs, should_cancel=[lambda: calls.append(0) or True, lambda: calls.append(1) or True],
                         allow_local_files=True)
    assert all(isinstance(o, Cancelled) for o in out)
    # one poll per row after the first block, one more per row when the results are assembled
    assert len(calls) == 4
