"""File storage on disk and the upload endpoints both fal clients use (spec section 7).

- JS (and python's fallback): ``POST /storage/upload/initiate`` -> ``{upload_url, file_url}``, then an
  unauthenticated ``PUT upload_url`` with the bytes (the URL's random id is the capability).
- Python (default): ``POST /storage/auth/token`` -> a token, then ``POST /files/upload`` with the raw bytes and
  ``Authorization: Bearer <token>`` -> ``{access_url}``.
- ``GET /files/{id}/{name}`` serves a stored file. The model worker reads these files by path
  (``resolve_url``, only for the origin the file URL was handed out on), not over HTTP, so uploads work without
  ``--allow-private-urls``. Bytes are written in a worker thread, never on the event loop.
Files live ``ttl`` seconds (the result TTL); multipart uploads (>90 MB) are not implemented.

``FileStoreBase`` is what the routes and the worker use: ``FileStore`` keeps files in the data dir (the SQLite
store), ``store_pg.PostgresFileStore`` in the database, so every worker host reads every upload. An object store
would implement the same six methods.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .schemas import CdnTokenResponse, CdnUploadResponse, ErrorDetail, UploadInitiateRequest, UploadInitiateResponse

__all__ = ["FileStoreBase", "FileStore", "build_storage_router", "clean_content_type", "clean_name"]

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_URL_ID_RE = re.compile(r"/files/([0-9a-f]{32})(?:/|$)")
_MIME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")


def clean_content_type(value: str | None) -> str:
    """A bare, well-formed MIME type (``application/octet-stream`` otherwise)."""
    value = (value or "").split(";", 1)[0].strip().lower()
    return value if _MIME_RE.match(value) else "application/octet-stream"


def clean_name(name: str | None, content_type: str) -> str:
    """A file name safe in a URL and on disk (one made up from the type when none is left)."""
    base = os.path.basename((name or "").replace("\\", "/"))
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:128]
    if not base:
        base = "upload" + (mimetypes.guess_extension(content_type) or ".bin")
    return base


class FileStoreBase:
    """Where uploads live: ``meta``/``create``/``write``/``local_path``/``purge`` per backend; ``put`` and
    ``resolve_url`` are shared. ``meta`` is ``{name, content_type, size, created_at, state}``; ``state`` is
    ``pending`` until the bytes are written, then ``ready``."""

    max_bytes: int

    @staticmethod
    def valid_id(file_id: str) -> bool:
        return bool(_ID_RE.match(file_id))

    def meta(self, file_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def create(self, file_name: str | None, content_type: str | None, origin: str | None = None) -> tuple[str, str]:
        """Reserve a file id for a later PUT; returns ``(id, clean_name)``. ``origin`` is the public base URL
        the file's URL is built on (only URLs on it are read by path in :meth:`resolve_url`)."""
        raise NotImplementedError

    def write(self, file_id: str, data: bytes, content_type: str | None = None) -> dict[str, Any]:
        """Store the bytes of a reserved file; returns its meta (``KeyError`` for an unknown id)."""
        raise NotImplementedError

    def local_path(self, file_id: str) -> Path | None:
        """A path on this host holding the bytes of a ready file (``None``: unknown or not uploaded yet)."""
        raise NotImplementedError

    def purge(self, ttl: float) -> int:
        """Delete files older than ``ttl`` seconds; returns how many."""
        raise NotImplementedError

    def put(self, data: bytes, file_name: str | None, content_type: str | None,
            origin: str | None = None) -> tuple[str, str]:
        file_id, name = self.create(file_name, content_type, origin)
        self.write(file_id, data)
        return file_id, name

    def resolve_url(self, url: str) -> str | None:
        """Local path of a file this server stored, given its URL: ``{origin}/files/{id}/...`` on the scheme,
        host, port and path prefix the file was uploaded through (another host's ``/files/`` URL is not ours)."""
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        if parts.scheme.lower() not in ("http", "https"):
            return None
        match = _URL_ID_RE.search(parts.path)
        if match is None:
            return None
        meta = self.meta(match.group(1))
        if meta is None or meta.get("state") != "ready" or not meta.get("origin"):
            return None
        origin = urlsplit(meta["origin"])
        if (parts.scheme.lower(), parts.netloc.lower()) != (origin.scheme.lower(), origin.netloc.lower()) or \
                not parts.path.startswith(f"{origin.path.rstrip('/')}/files/{match.group(1)}"):
            return None
        local = self.local_path(match.group(1))
        return None if local is None else str(local)


class FileStore(FileStoreBase):
    """Uploaded files under ``root``: ``{id}.bin`` with a ``{id}.json`` sidecar (name, type, size, state)."""

    def __init__(self, root: str | Path, *, max_bytes: int = 100 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def _meta_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    def data_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.bin"

    def _write_meta(self, file_id: str, meta: dict[str, Any]) -> None:
        tmp = self.root / f"{file_id}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._meta_path(file_id))

    def meta(self, file_id: str) -> dict[str, Any] | None:
        if not _ID_RE.match(file_id):
            return None
        try:
            return json.loads(self._meta_path(file_id).read_text())
        except (OSError, ValueError):
            return None

    def create(self, file_name: str | None, content_type: str | None, origin: str | None = None) -> tuple[str, str]:
        content_type = clean_content_type(content_type)
        file_id = uuid.uuid4().hex
        name = clean_name(file_name, content_type)
        self._write_meta(file_id, {"name": name, "content_type": content_type, "size": 0,
                                   "created_at": time.time(), "state": "pending", "origin": origin})
        return file_id, name

    def write(self, file_id: str, data: bytes, content_type: str | None = None) -> dict[str, Any]:
        """Store the bytes of a reserved file (durably: written, fsynced, then renamed into place)."""
        meta = self.meta(file_id)
        if meta is None:
            raise KeyError(file_id)
        tmp = self.root / f"{file_id}.bin.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.data_path(file_id))
        if content_type and meta["content_type"] == "application/octet-stream":
            meta["content_type"] = clean_content_type(content_type)
        meta.update(size=len(data), state="ready")
        self._write_meta(file_id, meta)
        return meta

    def local_path(self, file_id: str) -> Path | None:
        meta = self.meta(file_id)
        if meta is None or meta.get("state") != "ready" or not self.data_path(file_id).exists():
            return None
        return self.data_path(file_id)

    def purge(self, ttl: float) -> int:
        """Delete files older than ``ttl`` seconds."""
        cutoff = time.time() - ttl
        removed = 0
        for meta_path in self.root.glob("*.json"):
            try:
                if meta_path.stat().st_mtime >= cutoff:
                    continue
                file_id = meta_path.stem
                self.data_path(file_id).unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                removed += 1
            except OSError:
                continue
        return removed


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` when it is longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"File larger than {limit} bytes"}, status_code=413)


_RAW_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def build_storage_router(files: FileStoreBase, base_url: Any, cdn_token: str) -> APIRouter:
    """Routes of the storage API; ``base_url(request)`` gives the public origin for returned URLs."""
    router = APIRouter(tags=["storage"])

    def file_url(request: Request, file_id: str, name: str) -> str:
        return f"{base_url(request)}/files/{file_id}/{quote(name)}"

    @router.post("/storage/upload/initiate", response_model=UploadInitiateResponse)
    def initiate_upload(request: Request, body: UploadInitiateRequest,
                        storage_type: str | None = None) -> UploadInitiateResponse:
        """Reserve a file; PUT its bytes to ``upload_url`` (no auth needed), then use ``file_url``."""
        file_id, name = files.create(body.file_name, body.content_type, base_url(request))
        return UploadInitiateResponse(upload_url=f"{base_url(request)}/storage/upload/{file_id}",
                                      file_url=file_url(request, file_id, name))

    @router.put("/storage/upload/{file_id}", responses={404: {"model": ErrorDetail}, 413: {"model": ErrorDetail}},
                openapi_extra=_RAW_BODY)
    async def put_upload(file_id: str, request: Request) -> JSONResponse:
        """Bytes of a file reserved with ``/storage/upload/initiate``."""
        meta = await to_thread.run_sync(files.meta, file_id)
        if meta is None:
            return JSONResponse({"detail": "Unknown upload URL"}, status_code=404)
        if meta.get("state") == "ready":
            return JSONResponse({"detail": "This upload URL was already used"}, status_code=409)
        data = await _read_limited(request, files.max_bytes)
        if data is None:
            return _too_large(files.max_bytes)
        await to_thread.run_sync(files.write, file_id, data, request.headers.get("content-type"))
        return JSONResponse({"file_url": file_url(request, file_id, meta["name"])})

    @router.post("/storage/auth/token", response_model=CdnTokenResponse)
    def cdn_token_endpoint(request: Request, storage_type: str | None = None) -> CdnTokenResponse:
        """Token for ``POST /files/upload`` (what python's ``fal_client.upload`` asks for first)."""
        expires = datetime.now(timezone.utc) + timedelta(days=1)
        return CdnTokenResponse(token=cdn_token, token_type="Bearer", base_url=base_url(request),
                                expires_at=expires.isoformat())

    @router.post("/files/upload", response_model=CdnUploadResponse,
                 responses={413: {"model": ErrorDetail}}, openapi_extra=_RAW_BODY)
    async def cdn_upload(request: Request) -> Response:
        """Raw-bytes upload; name from ``X-Fal-File-Name``, type from ``Content-Type``."""
        data = await _read_limited(request, files.max_bytes)
        if data is None:
            return _too_large(files.max_bytes)
        file_id, name = await to_thread.run_sync(files.put, data, request.headers.get("x-fal-file-name"),
                                                 request.headers.get("content-type"), base_url(request))
        return JSONResponse(CdnUploadResponse(access_url=file_url(request, file_id, name)).model_dump())

    @router.get("/files/{file_id}/{name}", response_class=FileResponse,
                responses={200: {"content": {"application/octet-stream": {}}}, 404: {"model": ErrorDetail}})
    def get_file(file_id: str, name: str) -> Response:
        """A stored file, with the content type it was uploaded with."""
        meta = files.meta(file_id)
        path = files.local_path(file_id) if meta is not None else None
        if meta is None or path is None:
            return JSONResponse({"detail": "File not found"}, status_code=404)
        # Uploaded content is served from the API's origin: never let a browser run it as a page.
        headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
        return FileResponse(path, media_type=meta["content_type"], headers=headers)

    return router
