"""Load one image from a path, an http(s) URL, a ``data:`` URI, raw bytes or a PIL image, safely.

Every failure is an :class:`~nemotron_fast.errors.ImageError` with one sentence a client can act on: nothing
here lets a traceback, a hang or an unbounded allocation through. Limits:

- bytes: ``max_bytes`` (20 MiB by default) for files, downloads (streamed, Content-Length checked first) and
  decoded ``data:`` URIs;
- pixels: ``max_pixels`` (50 M by default), checked from the header BEFORE the pixel data is decoded; PIL's
  own decompression-bomb guard is turned into the same error;
- time: ``timeout`` seconds for each network operation and for the whole download;
- network: with ``allow_private=False`` every hop (redirects are followed by hand) must resolve only to public
  addresses, and the connection goes to the address that was checked (one DNS lookup per hop, see
  :mod:`nemotron_fast.netguard`); environment proxies are ignored so the check cannot be bypassed;
- local files: a path (``str`` or ``os.PathLike``) is read only with ``allow_local_files=True``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from ..netguard import AddressNotAllowed, PinnedTransport

__all__ = [
    "load_image",
    "fetch_url_bytes",
    "decode_image_bytes",
    "parse_data_uri",
    "FetchedBytes",
    "SUPPORTED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_MAX_REDIRECTS = 5
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class FetchedBytes:
    """A downloaded body: ``data``, the ``mime`` type the server sent (may be empty) and the final ``url``."""

    data: bytes
    mime: str
    url: str


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
    except ValueError as exc:
        raise ImageError(f"invalid image URL: {exc}", "image_url_invalid") from exc
    if scheme not in ("http", "https"):
        raise ImageError(f"unsupported URL scheme {parts.scheme!r} (use http, https or a data: URI)",
                         "image_url_invalid")
    if not host:
        raise ImageError(f"the image URL {url!r} has no host", "image_url_invalid")


def fetch_url_bytes(url: str, *, timeout: float = 10.0, max_bytes: int = DEFAULT_MAX_BYTES,
                    allow_private: bool = True) -> FetchedBytes:
    """Download ``url`` (http/https) with a byte limit and a time limit, following up to 5 redirects by hand.

    Each hop is re-checked (scheme, host and, with ``allow_private=False``, the resolved addresses, which are
    the addresses connected to: :class:`~nemotron_fast.netguard.PinnedTransport`). Raises
    :class:`ImageError` on a bad URL, a refused address, an HTTP error status, a timeout, a body over
    ``max_bytes`` or an empty body.
    """
    import httpx

    deadline = time.monotonic() + timeout
    current = url
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False,
                          transport=PinnedTransport(allow_private=allow_private)) as client:
            for _ in range(_MAX_REDIRECTS + 1):
                _check_url(current)
                with client.stream("GET", current, headers={"Accept": "image/*"}) as resp:
                    if resp.is_redirect:
                        loc = resp.headers.get("location")
                        if not loc:
                            raise ImageError(f"the image URL redirected ({resp.status_code}) without a Location",
                                             "image_fetch_error")
                        current = urljoin(current, loc)
                        continue
                    if resp.status_code >= 400:
                        raise ImageError(f"fetching the image URL failed with HTTP status {resp.status_code}",
                                         "image_fetch_error")
                    length = resp.headers.get("content-length")
                    if length and length.isdigit() and int(length) > max_bytes:
                        raise ImageError(f"the image is too large ({_mib(int(length))}; the limit is "
                                         f"{_mib(max_bytes)})", "image_too_large")
                    buf = bytearray()
                    for chunk in resp.iter_bytes():
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise ImageError(f"the image is too large (over the {_mib(max_bytes)} limit)",
                                             "image_too_large")
                        if time.monotonic() > deadline:
                            raise ImageError(f"fetching the image URL timed out after {timeout:g} s",
                                             "image_fetch_timeout")
                    if not buf:
                        raise ImageError("the image URL returned an empty body", "image_empty")
                    mime = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                    return FetchedBytes(bytes(buf), mime, current)
            raise ImageError(f"the image URL redirected more than {_MAX_REDIRECTS} times", "image_fetch_error")
    except AddressNotAllowed as exc:
        raise ImageError(f"the image URL host {exc}; fetching non-public addresses is not allowed",
                         "image_url_forbidden") from exc
    except httpx.TimeoutException as exc:
        raise ImageError(f"fetching the image URL timed out after {timeout:g} s", "image_fetch_timeout") from exc
    except httpx.InvalidURL as exc:
        raise ImageError(f"invalid image URL: {exc}", "image_url_invalid") from exc
    except httpx.HTTPError as exc:
        raise ImageError(f"fetching the image URL failed: {type(exc).__name__}: {exc}", "image_fetch_error") from exc


def parse_data_uri(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, str]:
    """Decode ``data:<mime>;base64,<payload>`` into ``(bytes, mime)``; raise :class:`ImageError` if malformed."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("malformed data URI: expected 'data:<mime>;base64,<data>'", "image_data_uri_invalid")
    params = header[len("data:"):].split(";")
    mime = params[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageError("data URI images must be base64-encoded ('data:<mime>;base64,...')", "image_data_uri_invalid")
    if mime and not mime.startswith("image/"):
        raise ImageError(f"the data URI has MIME type {mime!r}, not an image type", "image_unsupported_format")
    payload = re.sub(r"\s+", "", payload)
    if not payload:
        raise ImageError("the data URI holds no data", "image_empty")
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"the image is too large (over the {_mib(max_bytes)} limit)", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"the data URI is not valid base64: {exc}", "image_data_uri_invalid") from exc
    if len(data) > max_bytes:
        raise ImageError(f"the image is too large ({_mib(len(data))}; the limit is {_mib(max_bytes)})",
                         "image_too_large")
    return data, mime


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        is_file = path.is_file()
        size = path.stat().st_size if is_file else 0
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ImageError(f"could not read image file {str(path)!r}: {reason}", "image_not_found") from exc
    if not is_file:
        what = "is not a file" if path.exists() else "not found"
        raise ImageError(f"image file {str(path)!r} {what}", "image_not_found")
    if size > max_bytes:
        raise ImageError(f"the image file is too large ({_mib(size)}; the limit is {_mib(max_bytes)})",
                         "image_too_large")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"could not read image file {str(path)!r}: {exc.strerror or exc}", "image_not_found") from exc


def _check_image(img: Image.Image, max_pixels: int) -> Image.Image:
    """Validate the format and header size, then force a full decode; return a detached first frame."""
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {img.format} (supported: {', '.join(SUPPORTED_FORMATS)})",
                         "image_unsupported_format")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"the image has an empty size {w}x{h}", "image_invalid")
    if w * h > max_pixels:
        raise ImageError(f"the image has too many pixels ({w}x{h} = {w * h:,}; the limit is {max_pixels:,})",
                         "image_too_many_pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A freshly opened image sits on its first frame; n_frames is not read, as it walks every frame.
            img.load()
            # A copy owns its pixels: no file handle or later frames hang on to the original.
            return img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image has too many pixels ({w}x{h}): {exc}", "image_too_many_pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image data is truncated or corrupt ({img.format}, {w}x{h}): {exc}",
                         "image_corrupt") from exc


def decode_image_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (PNG, JPEG, WEBP, GIF first frame or BMP) into a fully loaded PIL image."""
    if not data:
        raise ImageError("the image data is empty", "image_empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image has too many pixels: {exc}", "image_too_many_pixels") from exc
    except UnidentifiedImageError as exc:
        fmt = _sniff_other_format(data)
        if fmt:
            raise ImageError(f"unsupported image format {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})",
                             "image_unsupported_format") from exc
        raise ImageError("the data is not an image PNG, JPEG, WEBP, GIF or BMP can decode", "image_invalid") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image data is truncated or corrupt: {exc}", "image_corrupt") from exc
    return _check_image(img, max_pixels)


def _sniff_other_format(data: bytes) -> str | None:
    """Name the format of an image PIL knows but we refuse (TIFF, ICO...), reading the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                return other.format
    # Any failure here only means there is no format we could name.
    except Exception:
        return None


def load_image(
    source: str | bytes | os.PathLike[str] | Image.Image,
    *,
    timeout: float = 10.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_private: bool = True,
    allow_local_files: bool = True,
) -> Image.Image:
    """Load one image and validate it; the result is fully decoded (its mode is whatever the file holds).

    ``source``: a PIL image (size-checked and returned as is), raw bytes, a local path, an ``http(s)://`` URL or
    a ``data:<mime>;base64,...`` URI. This low-level loader reads what it is given; ``allow_private=False``
    refuses non-public URL hosts and ``allow_local_files=False`` refuses paths (what
    :meth:`nemotron_fast.Pipeline.run` does unless asked). Raises :class:`~nemotron_fast.errors.ImageError` on
    every failure.
    """
    if isinstance(source, Image.Image):
        w, h = source.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise ImageError(f"the image size {w}x{h} is empty or over the {max_pixels:,} pixel limit",
                             "image_too_many_pixels")
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageError(f"the image is too large ({_mib(len(data))}; the limit is {_mib(max_bytes)})",
                             "image_too_large")
        return decode_image_bytes(data, max_pixels=max_pixels)
    if isinstance(source, os.PathLike):
        _check_local_allowed(str(source), allow_local_files)
        return decode_image_bytes(_read_file(Path(source), max_bytes), max_pixels=max_pixels)
    if not isinstance(source, str):
        raise ImageError(f"unsupported image source of type {type(source).__name__}", "image_invalid")
    text = source.strip()
    if not text:
        raise ImageError("the image source is an empty string", "image_empty")
    if text[:5].lower() == "data:":
        data, _ = parse_data_uri(text, max_bytes=max_bytes)
        return decode_image_bytes(data, max_pixels=max_pixels)
    if _SCHEME_RE.match(text):
        fetched = fetch_url_bytes(text, timeout=timeout, max_bytes=max_bytes, allow_private=allow_private)
        return decode_image_bytes(fetched.data, max_pixels=max_pixels)
    _check_local_allowed(text, allow_local_files)
    return decode_image_bytes(_read_file(Path(text), max_bytes), max_pixels=max_pixels)


def _check_local_allowed(path: str, allow_local_files: bool) -> None:
    if not allow_local_files:
        raise ImageError(f"reading local files is not allowed (got the path {path[:200]!r}); pass an http(s) URL "
                         "or a data: URI, or allow local files explicitly", "image_local_file_forbidden")
