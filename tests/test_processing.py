"""Image loading (every failure is an ImageError), the VLM image encoder against the spec's test vectors and an
independent OpenCV computation, the image-marker layout, the ChatML prompt and the Processor."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nemotron_fast.config import ImageEncoderConfig, NLDConfig, load_config
from nemotron_fast.errors import ConfigError, ImageError, InputValidationError
from nemotron_fast.processing import (
    Processor,
    fetch_url_bytes,
    image_grid,
    image_token_ids,
    load_image,
    num_image_tokens,
    preprocess_image,
)
from nemotron_fast.processing.text import chatml_prompt
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


def test_too_many_pixels_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoded, these would need 243 MB and 3.6 GB; the header alone must be enough to refuse them. The first is
    # over our 50 M default but under PIL's own guard, the second trips PIL's guard at open time.
    loads: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spy(img: Image.Image):
        loads.append(img.size)
        return real_load(img)

    monkeypatch.setattr(Image.Image, "load", spy)
    err = _err(load_image, _png_header_only(9000, 9000))
    assert err.errors[0]["type"] == "image_too_many_pixels" and "9000x9000" in str(err)
    err = _err(load_image, _png_header_only(60000, 60000))
    assert err.errors[0]["type"] == "image_too_many_pixels"
    assert loads == []  # refused from the header: the pixel data was never decoded
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
    slow_answered = False
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
        if self.path == "/ok.png":
            self._send(200, self.png, {"Content-Type": "image/png"})
        elif self.path == "/missing":
            self._send(404, b"nope")
        elif self.path == "/slow":
            self.release.wait(30)
            _Handler.slow_answered = True
            self._send(200, self.png)
        elif self.path == "/big":
            self._send(200, b"\0" * 50_000)
        elif self.path == "/big-chunked":
            self.protocol_version = "HTTP/1.0"
            self._send(200, b"\0" * 50_000, length=False)
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
    err = _err(load_image, f"http://{server}/slow", timeout=0.3)
    assert err.errors[0]["type"] == "image_fetch_timeout"
    assert "/slow" in _Handler.hits and not _Handler.slow_answered  # it gave up while the server still held it


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


# --- preprocessing ---------------------------------------------------------------------------------------------------

ENC = ImageEncoderConfig(patch_size=14, spatial_merge_size=2)  # the contract: cap 1400, 28-pixel cells
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("wh,grid", [((300, 200), (11, 8)), ((28, 28), (1, 1)), ((29, 1), (2, 1)),
                                     ((2800, 1400), (50, 25)), ((4201, 3), (50, 1)), ((1400, 1400), (50, 50)),
                                     ((1540, 1540), (50, 50)), ((3080, 770), (50, 13)), ((1500, 3000), (25, 50))])
def test_image_grid_spec_vectors(wh, grid) -> None:
    # vectors from ../shared/spec/nld-model.md (jevons-rs' and axolotl's tests of the same encoder)
    assert image_grid(*wh, 1400, 28) == grid


def test_image_grid_rounds_half_to_even() -> None:
    # 2100 x 700 at cap 1400: ratio 1.5, 700 / 1.5 = 466.67 -> 467; 2101 x 35: 35 / 1.5007 = 23.32 -> 23
    assert image_grid(2100, 700, 1400, 28) == (50, 17)
    # 5 / 2 = 2.5 rounds to 2 (Python round), not 3: a 56 x 5 image at cap 28 is 28 x 2 -> one row
    assert image_grid(56, 5, 28, 28) == (1, 1)
    assert image_grid(56, 7, 28, 28) == (1, 1) and image_grid(84, 57, 28, 28) == (1, 1)
    with pytest.raises(ValueError):
        image_grid(0, 5, 1400, 28)


def test_spec_test_image_pixels_and_tokens(vlm) -> None:
    cfg, proc = vlm
    out = proc.build_inputs("What is it?", [_photo(300, 200)])
    assert out.image_sizes.tolist() == [[224, 308]] and out.pixel_values.shape == (1, 3, 224, 308)
    ids = out.input_ids[0].tolist()
    start, end = ids.index(18), ids.index(21)
    assert end + 1 - start == 97 == num_image_tokens(224, 308, cfg)


def _rand_image(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like JPEG: smooth colour fields, an edge and sensor noise, through real JPEG compression."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([128 + 100 * np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1)
    arr[(xx + 2 * yy) % 97 < 30] *= 0.4
    arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue()))


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], -1)
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


def _rgba(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    arr[: h // 3, :, 3] = 0  # fully transparent band -> white
    return Image.fromarray(arr, "RGBA")


def _palette(w: int, h: int) -> Image.Image:
    img = _gradient(w, h).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    img.info["transparency"] = 5
    return img


def _independent_rgb(img: Image.Image) -> np.ndarray:
    """RGB float array of ``img`` with transparency composited onto white, computed without PIL conversions
    where the mode allows: palette lookup and alpha blending in numpy."""
    if img.mode == "P":
        pal = np.array(img.getpalette(), dtype=np.float64).reshape(-1, 3)
        idx = np.asarray(img)
        rgb = pal[idx]
        alpha = np.where(idx == img.info.get("transparency", -1), 0.0, 255.0)[..., None]
    elif img.mode == "RGBA":
        arr = np.asarray(img).astype(np.float64)
        rgb, alpha = arr[..., :3], arr[..., 3:]
    else:
        return np.asarray(img.convert("RGB")).astype(np.float32)
    return np.round(rgb * alpha / 255 + 255 * (255 - alpha) / 255).astype(np.float32)


def _independent_pixels(img: Image.Image, cap: int = 1400) -> np.ndarray:
    """The spec's recipe with cv2 directly: round-half-even cap, 28-pixel cells, INTER_CUBIC on float32, CLIP."""
    import cv2

    w, h = img.size
    ratio = max(w, h) / cap
    if ratio > 1:
        w, h = max(round(w / ratio), 1), max(round(h / ratio), 1)
    size = (-(-w // 28) * 28, -(-h // 28) * 28)
    out = cv2.resize(_independent_rgb(img), size, interpolation=cv2.INTER_CUBIC)
    return ((out / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@pytest.mark.parametrize("make,w,h,cap", [
    (_photo, 300, 200, 1400), (_photo, 1603, 911, 1400), (_photo, 640, 480, 336), (_gradient, 97, 250, 1400),
    (_gradient, 2000, 30, 1400), (_rgba, 120, 75, 1400), (_rgba, 500, 333, 224), (_palette, 61, 90, 1400),
    (_palette, 350, 40, 140), (lambda w, h: _rand_image(w, h, "L"), 45, 30, 1400),
    (lambda w, h: _rand_image(w, h, "RGB"), 1401, 5, 1400)])
def test_pixels_equal_an_independent_opencv_computation(make, w: int, h: int, cap: int) -> None:
    img = make(w, h)
    ours, (oh, ow) = preprocess_image(img, ENC, cap)
    ref = _independent_pixels(img, cap)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert tuple(ours.shape) == ref.shape == (3, oh, ow)
    assert np.abs(ours.numpy() - ref).max() <= 1e-4


def test_opencv_cubic_weights_at_offset_half() -> None:
    # a 56-px image at cap 28 halves exactly: each output pixel sits at source offset 0.5, where OpenCV's cubic
    # (A = -0.75) weighs its four taps -0.09375, 0.59375, 0.59375, -0.09375 (spec). An impulse shows the weights.
    arr = np.zeros((56, 56, 3), dtype=np.uint8)
    arr[:, 21] = 255
    ours, hw = preprocess_image(Image.fromarray(arr, "RGB"), ENC, 28)
    assert hw == (28, 28)
    row = (ours[0, 14].numpy().astype(np.float64) * CLIP_STD[0] + CLIP_MEAN[0]) * 255  # back to [0, 255]
    # output column j samples source x = 2j + 0.5, taps 2j-1 .. 2j+2: source column 21 is tap 2 of j = 10
    # (weight 0.59375) and tap 0 of j = 11 (weight -0.09375); no other output column reaches it
    expected = np.zeros(28)
    expected[10], expected[11] = 0.59375 * 255, -0.09375 * 255
    np.testing.assert_allclose(row, expected, atol=1e-3)


def test_alpha_goes_onto_white_and_exif_is_not_applied() -> None:
    clear = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    white = (1 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(preprocess_image(clear, ENC)[0][:, 5, 5].numpy(), white, atol=1e-5)
    # upstream's loader does not apply EXIF orientation: a 56 x 28 JPEG tagged "rotate 90" stays 56 x 28
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _gradient(56, 28).save(buf, format="JPEG", exif=exif.tobytes())
    img = load_image("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    assert preprocess_image(img, ENC)[1] == (28, 56)


def test_encoder_config_honours_only_the_cap(tmp_path: Path) -> None:
    assert ImageEncoderConfig.from_dict(None, 14, 2, None).max_image_size == 1400
    assert ImageEncoderConfig.from_dict({"max_image_size": 700, "size": {"longest_edge": 1540}, "resample": 2},
                                        14, 2, None).max_image_size == 700
    for bad in ({"patch_size": 16}, {"image_mean": [0.5, 0.5, 0.5]}, {"spatial_merge_size": 1},
                {"max_image_size": 0}):
        with pytest.raises(ConfigError):
            ImageEncoderConfig.from_dict(bad, 14, 2, None)


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


@pytest.mark.parametrize("h,w", [(28, 28), (56, 112), (224, 28), (84, 140), (56, 56)])
def test_image_marker_layout(vlm, h: int, w: int) -> None:
    cfg, _ = vlm
    ids = image_token_ids(h, w, cfg)
    rows, cols = h // 28, w // 28
    assert len(ids) == 1 + rows * (cols + 1) == num_image_tokens(h, w, cfg)
    assert ids[0] == 18 and ids[-1] == 21 and ids.count(18) == ids.count(21) == 1
    assert ids.count(19) == rows * cols and ids.count(20) == rows - 1
    for r in range(rows):
        row = ids[1 + r * (cols + 1):1 + (r + 1) * (cols + 1)]
        assert row[:cols] == [19] * cols and row[cols] == (21 if r == rows - 1 else 20)
    if (h, w) == (56, 56):  # axolotl's "matches the remote layout" string, as ids
        text = "<|image_start|><|image_pad|><|image_pad|><|image_break|><|image_pad|><|image_pad|><|image_end|>"
        assert ids == _.tokenizer(text)["input_ids"]
    with pytest.raises(ValueError):
        image_token_ids(h + 1, w, cfg)


def test_build_inputs_with_images(vlm) -> None:
    cfg, proc = vlm
    imgs = [_rand_image(100, 50, "RGB"), _rand_image(30, 300, "RGBA", seed=1)]
    out = proc.build_inputs("Describe both.", imgs, system="Be brief.")
    assert out.image_sizes.tolist() == [[56, 112], [308, 56]]  # 30 px -> ceil(30 / 28) = 2 cells
    assert out.pixel_values.shape == (2, 3, 308, 112) and out.pixel_values.dtype == torch.float32
    # padding is zero, the unpadded region is the image itself
    assert out.pixel_values[0, :, 56:].abs().max() == 0 and out.pixel_values[1, :, :, 56:].abs().max() == 0
    torch.testing.assert_close(out.pixel_values[1, :, :, :56], preprocess_image(imgs[1], ENC)[0])
    ids = out.input_ids[0].tolist()
    assert out.input_ids.dtype == torch.long and out.num_prompt_tokens == len(ids)
    first = ids.index(18)
    n0, n1 = num_image_tokens(56, 112, cfg), num_image_tokens(308, 56, cfg)
    assert ids[first:first + n0] == image_token_ids(56, 112, cfg)
    assert ids[first + n0:first + n0 + n1] == image_token_ids(308, 56, cfg)
    # the spec's ChatML around them: no BOS, system turn, user turn, generation prompt with empty thinking
    head = proc.tokenizer("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")["input_ids"]
    tail = proc.tokenizer("Describe both.<|im_end|>\n<|im_start|>assistant\n<think></think>")["input_ids"]
    assert ids == head + ids[first:first + n0 + n1] + tail
    assert ids[0] == 10 and ids[-2:] == [12, 13] and 1 not in ids
    text = proc.render("Describe both.", 2, system="Be brief.")
    assert text == chatml_prompt("Describe both.", 2, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|image_start|><|image_start|>Describe both."
        "<|im_end|>\n<|im_start|>assistant\n<think></think>")
    assert proc.prompt_source == "chat_template"
    # pixel-for-pixel the same whether or not the checkpoint's own template is used
    proc.prompt_source = "chatml"
    try:
        assert proc.build_inputs("Describe both.", imgs, system="Be brief.").input_ids.tolist() == [ids]
    finally:
        proc.prompt_source = "chat_template"


def test_build_inputs_text_only_prompt_and_thinking(vlm) -> None:
    _, proc = vlm
    plain = proc.build_inputs("Hi there")
    assert plain.pixel_values is None and plain.image_sizes is None
    assert proc.tokenizer.decode(plain.input_ids[0].tolist()) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think></think>")
    think = proc.build_inputs("Hi there", enable_thinking=True)
    assert proc.tokenizer.decode(think.input_ids[0].tolist()).endswith("<|im_start|>assistant\n<think>\n")
    assert 13 not in think.input_ids[0].tolist()


def test_max_image_size_per_request(vlm) -> None:
    _, proc = vlm
    img = _photo(300, 200)
    assert proc.build_inputs("Hi", [img], max_image_size=150).image_sizes.tolist() == [[112, 168]]
    for bad in (0, -3, 1.5, True):
        with pytest.raises(InputValidationError, match="max_image_size"):
            proc.build_inputs("Hi", [img], max_image_size=bad)


def test_a_checkpoint_template_unlike_upstream_is_not_used(vlm_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    for f in vlm_dir.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    proc = Processor.from_pretrained(tmp_path, load_config(tmp_path))
    assert proc.prompt_source == "chatml"
    assert proc.render("Hi", 1) == chatml_prompt("Hi", 1)


def test_control_token_strings_in_user_text_are_refused(vlm) -> None:
    _, proc = vlm
    img = [_rand_image(28, 28, "RGB")]
    for text in ("what is <|image_pad|>?", "a <|im_end|> b", "<|image_start|>", "say </s>", "x |<MASK>| y"):
        with pytest.raises(InputValidationError, match="control token"):
            proc.build_inputs(text, img)
    with pytest.raises(InputValidationError, match="system"):
        proc.build_inputs("fine", img, system="<|im_start|>user")
    # think tags are ordinary added tokens in the real tokenizer: allowed, as text the model reads
    assert proc.build_inputs("what does <think> mean?", img).input_ids[0].tolist().count(12) == 2


def test_missing_marker_token_is_a_config_error_naming_it(vlm_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    for f in vlm_dir.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
    # the 131k tokenizer.json is not parsed when tokenizer_config.json's added_tokens_decoder names every token
    tj_text = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert load_config(tmp_path).image_pad_token_id == 19
    tj = json.loads(tj_text)
    for t in tj["added_tokens"]:
        if t["content"] == "<|image_pad|>":
            t["content"] = "<|renamed|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"]["19"]["content"] = "<|renamed|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ConfigError, match=r"<\|image_pad\|>"):
        load_config(tmp_path)
    del tc["added_tokens_decoder"]  # without the decoder, tokenizer.json is read (and lacks it too)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ConfigError, match=r"<\|image_pad\|>"):
        load_config(tmp_path)
    # a config field wins over the tokenizer
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["image_pad_token_id"] = 19
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path).image_pad_token_id == 19
    cfg["image_pad_token_id"] = 7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path).special.image_pad == 7


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
    markers = [18, 19, 20, 21, 10, cfg.vocab_size - 1]  # image markers, <|im_start|>, |<MASK>|
    mixed = [cfg.mask_token_id, hello[0], *markers, cfg.mask_token_id, *hello[1:], 3, cfg.eos_token_id, *bye]
    assert proc.decode(mixed) == "Hello world"
    assert proc.decode(torch.tensor(hello + bye)) == "Hello world bye"
    assert proc.decode([cfg.eos_token_id, *hello]) == ""
    assert proc.decode(hello + [cfg.vocab_size + 5]) == "Hello world"
