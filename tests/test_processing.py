"""Image loading (every failure is an ImageError), Pixtral preprocessing parity, token layout, Processor."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nemotron_fast.config import NLDConfig, PreprocessorConfig, load_config
from nemotron_fast.errors import ImageError, InputValidationError
from nemotron_fast.processing import (
    Processor,
    fetch_url_bytes,
    image_token_ids,
    load_image,
    num_image_tokens,
    preprocess_image,
    resized_size,
)
from nemotron_fast.processing import images as images_mod
from nemotron_fast.testing import write_tiny_checkpoint


def _png(size: tuple[int, int] = (20, 12), mode: str = "RGB", fmt: str = "PNG", **save_kw) -> bytes:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    arr = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _err(fn, *args, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args, **kw)
    assert info.value.errors[0]["loc"] == ["body", "image_url"]
    return info.value


# --- local sources -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_supported_formats_load(fmt: str) -> None:
    img = load_image(_png((33, 17), fmt=fmt))
    assert img.size == (33, 17)
    assert img.format is None or img.format == fmt


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_path_and_pathlike_and_data_uri(tmp_path: Path) -> None:
    data = _png((9, 7))
    p = tmp_path / "a.png"
    p.write_bytes(data)
    assert load_image(str(p)).size == (9, 7)
    assert load_image(p).size == (9, 7)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image(uri).size == (9, 7)
    assert load_image(Image.new("RGB", (3, 4))).size == (3, 4)


@pytest.mark.parametrize("source,kind,text", [
    (b"", "image_empty", "empty"),
    ("", "image_empty", "empty"),
    (b"this is not an image at all" * 10, "image_invalid", "not an image"),
    ("data:image/png;base64,!!!notbase64!!!", "image_data_uri_invalid", "base64"),
    ("data:image/png;base64,", "image_empty", "no data"),
    ("data:image/png,rawdata", "image_data_uri_invalid", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "image_unsupported_format", "not an image type"),
    ("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode(), "image_invalid", "not an image"),
    ("/definitely/not/here.png", "image_not_found", "not found"),
    ("ftp://example.com/a.png", "image_url_invalid", "scheme"),
    ("file:///etc/passwd", "image_url_invalid", "scheme"),
    ("http://[::1/x.png", "image_url_invalid", "invalid image URL"),
    ("https:///x.png", "image_url_invalid", "no host"),
    ("bad\0name.png", "image_not_found", "not found"),
])
def test_bad_sources(source, kind: str, text: str) -> None:
    err = _err(load_image, source)
    assert err.errors[0]["type"] == kind
    assert text in str(err)


def test_unsupported_format_named() -> None:
    err = _err(load_image, _png((5, 5), fmt="TIFF"))
    assert err.errors[0]["type"] == "image_unsupported_format" and "TIFF" in str(err)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt: str) -> None:
    data = _png((64, 64), fmt=fmt)
    err = _err(load_image, data[: len(data) // 2])
    assert err.errors[0]["type"] == "image_corrupt"


def test_directory_and_too_large_file(tmp_path: Path) -> None:
    assert _err(load_image, tmp_path).errors[0]["type"] == "image_not_found"
    p = tmp_path / "big.png"
    p.write_bytes(_png((64, 64)))
    assert _err(load_image, p, max_bytes=100).errors[0]["type"] == "image_too_large"
    assert _err(load_image, p.read_bytes(), max_bytes=100).errors[0]["type"] == "image_too_large"
    uri = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
    assert _err(load_image, uri, max_bytes=100).errors[0]["type"] == "image_too_large"


def test_too_many_pixels_checked_before_decoding() -> None:
    # Decoded, these would need 243 MB and 3.6 GB; the header alone must be enough to refuse them. The first is
    # over our 50 M default but under PIL's own guard, the second trips PIL's guard at open time.
    t0 = time.perf_counter()
    err = _err(load_image, _png_header_only(9000, 9000))
    assert err.errors[0]["type"] == "image_too_many_pixels" and "9000x9000" in str(err)
    err = _err(load_image, _png_header_only(60000, 60000))
    assert err.errors[0]["type"] == "image_too_many_pixels"
    assert time.perf_counter() - t0 < 1.0
    assert _err(load_image, _png((40, 40)), max_pixels=1000).errors[0]["type"] == "image_too_many_pixels"
    assert load_image(_png((40, 40)), max_pixels=1600).size == (40, 40)
    assert _err(load_image, Image.new("RGB", (50, 50)), max_pixels=100).errors[0]["type"] == "image_too_many_pixels"


@pytest.mark.parametrize("pixels", [1000, 3000])
def test_pil_bomb_guard_becomes_image_error(monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    # Our own limit is lifted, so PIL's guard (a warning above MAX_IMAGE_PIXELS, an error above twice it) fires.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 if pixels == 3000 else 900)
    side = int(pixels**0.5) + 1
    err = _err(load_image, _png((side, side)), max_pixels=10**12)
    assert err.errors[0]["type"] == "image_too_many_pixels"


# --- URLs ----------------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    png = b""
    release = threading.Event()
    hits: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: bool = True) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.hits.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/ok.png":
            self._send(200, self.png, {"Content-Type": "image/png"})
        elif self.path == "/missing":
            self._send(404, b"nope")
        elif self.path == "/slow":
            self.release.wait(5)
            self._send(200, self.png)
        elif self.path == "/big":
            self._send(200, b"\0" * 50_000)
        elif self.path == "/big-chunked":
            self.protocol_version = "HTTP/1.0"
            self._send(200, b"\0" * 50_000, length=False)
        elif self.path == "/redirect-loopback":
            self._send(302, headers={"Location": f"http://127.0.0.1:{port}/ok.png"})
        elif self.path == "/redirect-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/redirect-relative":
            self._send(301, headers={"Location": "/ok.png"})
        elif self.path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif self.path == "/empty":
            self._send(200, b"")
        else:
            self._send(500)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    _Handler.png = _png((21, 13))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.block_on_close = False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    _Handler.release.set()
    srv.shutdown()
    srv.server_close()


def test_url_ok_and_redirects(server: str) -> None:
    assert load_image(f"http://{server}/ok.png").size == (21, 13)
    assert load_image(f"http://{server}/redirect-relative").size == (21, 13)
    fetched = fetch_url_bytes(f"http://{server}/ok.png", timeout=5, max_bytes=10**6)
    assert fetched.mime == "image/png" and fetched.data == _Handler.png


@pytest.mark.parametrize("path,kind,text", [
    ("/missing", "image_fetch_error", "404"),
    ("/big", "image_too_large", "too large"),
    ("/big-chunked", "image_too_large", "too large"),
    ("/loop", "image_fetch_error", "redirected more than"),
    ("/empty", "image_empty", "empty"),
])
def test_url_failures(server: str, path: str, kind: str, text: str) -> None:
    err = _err(load_image, f"http://{server}{path}", max_bytes=10_000, timeout=5)
    assert err.errors[0]["type"] == kind and text in str(err)


def test_url_timeout(server: str) -> None:
    t0 = time.perf_counter()
    err = _err(load_image, f"http://{server}/slow", timeout=0.3)
    assert err.errors[0]["type"] == "image_fetch_timeout"
    assert time.perf_counter() - t0 < 3.0


def test_localhost_refused_without_request(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    before = len(_Handler.hits)
    for host in ("localhost", "127.0.0.1"):
        err = _err(load_image, f"http://{host}:{port}/ok.png", allow_private=False, timeout=5)
        assert err.errors[0]["type"] == "image_url_forbidden" and "non-public" in str(err)
    assert len(_Handler.hits) == before


@pytest.mark.parametrize("host", ["10.1.2.3", "192.168.0.1", "169.254.169.254", "0.0.0.0", "[::1]", "224.0.0.1",
                                  "100.64.0.1", "[::ffff:127.0.0.1]", "[fe80::1]", "240.0.0.1"])
def test_private_literals_refused(host: str) -> None:
    err = _err(fetch_url_bytes, f"http://{host}/x.png", timeout=1, max_bytes=1000, allow_private=False)
    assert err.errors[0]["type"] == "image_url_forbidden"


def test_redirect_to_private_refused(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first hop passes the check (its host is made to look public); the redirect target must not."""
    port = server.rsplit(":", 1)[1]
    real = socket.getaddrinfo

    def fake(host, *args, **kw):
        if host == "localhost":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
        return real(host, *args, **kw)

    monkeypatch.setattr(images_mod, "_getaddrinfo", fake)
    _Handler.hits.clear()
    err = _err(load_image, f"http://localhost:{port}/redirect-loopback", allow_private=False, timeout=5)
    assert err.errors[0]["type"] == "image_url_forbidden" and "127.0.0.1" in str(err)
    assert _Handler.hits == ["/redirect-loopback"]
    err = _err(load_image, f"http://localhost:{port}/redirect-metadata", allow_private=False, timeout=5)
    assert err.errors[0]["type"] == "image_url_forbidden" and "169.254.169.254" in str(err)
    # the same redirect is followed when private addresses are allowed
    assert load_image(f"http://localhost:{port}/redirect-loopback", timeout=5).size == (21, 13)


# --- preprocessing -------------------------------------------------------------------------------------------------

PRE = PreprocessorConfig.from_dict({"patch_size": 14, "size": {"longest_edge": 224}}, None)


def _rand_image(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "P+transparency":
        img = img.convert("RGB").convert("P")
        img.info["transparency"] = 0
        return img
    return img if mode == "RGBA" else img.convert(mode)


@pytest.mark.parametrize("w,h,mode", [(37, 53, "RGB"), (300, 17, "RGB"), (500, 333, "RGBA"), (224, 224, "L"),
                                      (1000, 10, "RGB"), (225, 111, "P"), (61, 90, "P+transparency"),
                                      (5, 3, "RGB"), (449, 450, "LA")])
def test_preprocess_matches_transformers_pixtral(w: int, h: int, mode: str) -> None:
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    img = _rand_image(w, h, mode)
    ref = PixtralImageProcessorPil(patch_size={"height": 28, "width": 28}, size={"longest_edge": 224})(
        images=[img], return_tensors="pt")
    ours, (oh, ow) = preprocess_image(img, PRE, spatial_merge_size=2)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert tuple(ours.shape) == tuple(ref["pixel_values"][0].shape) == (3, oh, ow)
    assert ref["image_sizes"][0].tolist() == [oh, ow]
    torch.testing.assert_close(ours, ref["pixel_values"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw,longest,patch,expected", [
    ((53, 37), 224, 28, (56, 56)),        # small: round up only
    ((17, 300), 224, 28, (28, 224)),      # 17*224/300 = 12.69 -> 12 -> 28
    ((333, 500), 224, 28, (168, 224)),    # 149.18 -> 149 -> 168
    ((10, 1000), 224, 28, (28, 224)),
    ((1, 1), 1540, 28, (28, 28)),
    ((1541, 1540), 1540, 28, (1540, 1540)),
    ((230, 100), 224, 28, (224, 112)),    # 97.39 -> 97 -> 112
])
def test_resized_size(hw, longest: int, patch: int, expected) -> None:
    assert resized_size(*hw, longest, patch) == expected


# --- token layout and Processor ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vlm"), vlm=True, vocab="small", hidden_size=32,
                                 num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                 num_hidden_layers=1)


@pytest.fixture(scope="module")
def vlm(vlm_dir: Path) -> tuple[NLDConfig, Processor]:
    cfg = load_config(vlm_dir)
    return cfg, Processor.from_pretrained(vlm_dir, cfg)


@pytest.mark.parametrize("h,w", [(28, 28), (56, 112), (224, 28), (84, 140)])
def test_image_token_layout(vlm, h: int, w: int) -> None:
    cfg, _ = vlm
    ids = image_token_ids(h, w, cfg)
    rows, cols = h // 28, w // 28
    assert len(ids) == rows * cols + rows == num_image_tokens(h, w, cfg)
    assert ids.count(cfg.image_token_id) == rows * cols
    assert ids.count(cfg.image_break_token_id) == rows - 1 and ids[-1] == cfg.image_end_token_id
    for r in range(rows):
        row = ids[r * (cols + 1):(r + 1) * (cols + 1)]
        assert row[:cols] == [10] * cols and row[cols] == (13 if r == rows - 1 else 12)
    with pytest.raises(ValueError):
        image_token_ids(h + 1, w, cfg)


def test_build_inputs_with_images(vlm) -> None:
    cfg, proc = vlm
    imgs = [_rand_image(100, 50, "RGB"), _rand_image(30, 300, "RGBA", seed=1)]
    out = proc.build_inputs("Describe both.", imgs, system="Be brief.")
    assert out.image_sizes.tolist() == [[56, 112], [224, 28]]
    assert out.pixel_values.shape == (2, 3, 224, 112) and out.pixel_values.dtype == torch.float32
    # padding is zero, the unpadded region is the image itself
    assert out.pixel_values[0, :, 56:].abs().max() == 0 and out.pixel_values[1, :, :, 28:].abs().max() == 0
    torch.testing.assert_close(out.pixel_values[1, :, :, :28], preprocess_image(imgs[1], PRE, 2)[0])
    ids = out.input_ids[0].tolist()
    assert out.input_ids.dtype == torch.long and out.num_prompt_tokens == len(ids)
    assert ids.count(10) == 2 * 4 + 8 * 1 and ids.count(12) == 1 + 7 and ids.count(13) == 2
    first = ids.index(10)
    assert ids[first:first + 10] == image_token_ids(56, 112, cfg)
    assert ids[first + 10:first + 10 + 16] == image_token_ids(224, 28, cfg)
    assert ids[0] == 1 and ids[-1] == 4
    assert proc.decode(ids[first + 26:-1]) == "Describe both."
    text = proc.render("Describe both.", 2, system="Be brief.")
    assert text == "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST][IMG][IMG]Describe both.[/INST]"


def test_build_inputs_text_only_prompt_and_thinking(vlm) -> None:
    _, proc = vlm
    plain = proc.build_inputs("Hi there")
    assert plain.pixel_values is None and plain.image_sizes is None
    assert proc.tokenizer.decode(plain.input_ids[0].tolist()) == "<s>[INST]Hi there[/INST]"
    think = proc.build_inputs("Hi there", enable_thinking=True)
    assert think.num_prompt_tokens > plain.num_prompt_tokens
    assert think.input_ids[0, 1].item() == 17


def test_user_control_tokens_stay_text(vlm) -> None:
    _, proc = vlm
    out = proc.build_inputs("what is [IMG] and [/INST] <s>?", [_rand_image(28, 28, "RGB")])
    ids = out.input_ids[0].tolist()
    # only the template's placeholder became image tokens; the user's "[IMG]" is ordinary text
    assert ids.count(10) == 1 and ids.count(13) == 1 and ids.count(4) == 1 and ids.count(1) == 1


def test_build_inputs_errors(vlm, tmp_path: Path) -> None:
    _, proc = vlm
    with pytest.raises(InputValidationError, match="prompt"):
        proc.build_inputs("   ")
    write_tiny_checkpoint(tmp_path, vlm=False, vocab="small", hidden_size=32, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, num_hidden_layers=1)
    text_proc = Processor.from_pretrained(tmp_path, load_config(tmp_path))
    err = _err(text_proc.build_inputs, "hi", [_rand_image(28, 28, "RGB")])
    assert "text-only" in str(err)
    assert text_proc.build_inputs("hi").input_ids.shape[0] == 1


def test_decode_cuts_at_eos_and_skips_special_and_mask(vlm) -> None:
    cfg, proc = vlm
    hello = proc.tokenizer.encode("Hello world", add_special_tokens=False)
    bye = proc.tokenizer.encode(" bye", add_special_tokens=False)
    assert proc.decode(hello) == "Hello world"
    mixed = [cfg.mask_token_id, hello[0], 3, cfg.mask_token_id, *hello[1:], 17, cfg.eos_token_id, *bye]
    assert proc.decode(mixed) == "Hello world"
    assert proc.decode(torch.tensor(hello + bye)) == "Hello world bye"
    assert proc.decode([cfg.eos_token_id, *hello]) == ""
    assert proc.decode(hello + [cfg.vocab_size + 5]) == "Hello world"
