"""The playground: a static page (``server/static/``, no build step, no CDN) that runs the endpoint through the
server's own queue API and draws the diffusion live from the opt-in step stream (see ``server.steps``).

``GET /`` redirects to ``/playground``; ``/playground/config.json`` tells the page the app id and whether an
API key is required; ``/playground/example.png`` is the demo model's bundled example scene. These GETs need no
key: the page sends the key the user types with its API calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from .service import Service

__all__ = ["build_playground_router", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def build_playground_router(svc: Service) -> APIRouter:
    """Routes of the playground page and its assets (kept out of the OpenAPI schema)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def root() -> RedirectResponse:
        # relative, so it also lands right behind a path prefix
        return RedirectResponse("playground", status_code=307)

    @router.get("/playground")
    def page() -> Response:
        return _static("index.html", "text/html")

    @router.get("/playground/config.json")
    def config() -> dict[str, Any]:
        return {"app_id": svc.config.app_id, "api_key_required": bool(svc.config.api_key),
                "example_image": "playground/example.png" if _example() is not None else None}

    @router.get("/playground/example.png")
    def example() -> Response:
        path = _example()
        if path is None:
            return JSONResponse({"detail": "The demo example image is not installed"}, status_code=404)
        return FileResponse(path, media_type="image/png")

    @router.get("/playground/{name}")
    def asset(name: str) -> Response:
        if name not in _ASSETS:
            return JSONResponse({"detail": f"No playground file {name!r}"}, status_code=404)
        return _static(name, _ASSETS[name])

    return router


def _static(name: str, media_type: str) -> Response:
    path = STATIC_DIR / name
    if not path.is_file():
        return JSONResponse({"detail": f"The playground is not installed: {path} is missing"}, status_code=404)
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})


def _example() -> Path | None:
    from ..demo import example_image_path

    try:
        return example_image_path()
    except FileNotFoundError:
        return None
