"""Exception types shared by the loader, the pipeline, the CLI and the server.

Every caller mistake becomes one of these with a sentence that names the field and the numbers, so the CLI
can print it and the server can map it to a 4xx without ever showing a traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NemotronFastError", "ConfigError", "CheckpointError", "InputValidationError", "ImageError", "Cancelled"]


class NemotronFastError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(NemotronFastError, ValueError):
    """A checkpoint's config files are missing a field, have an unknown value, or contradict each other."""

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None) -> None:
        self.field = field
        self.path = path
        where = f" ({path})" if path else ""
        super().__init__(f"{message}{where}")


class CheckpointError(NemotronFastError, ValueError):
    """Weights files are missing, unreadable, or do not match the config (missing/unexpected/mis-shaped)."""


class InputValidationError(NemotronFastError, ValueError):
    """A request field breaks a schema rule.

    ``errors`` is a FastAPI/pydantic-style list: ``[{"loc": ["body", field], "msg": ..., "type": ...}]``.
    """

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        if not errors:
            raise ValueError("InputValidationError needs at least one error")
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors))

    @classmethod
    def single(cls, field: str, msg: str, type_: str = "value_error", value: Any = None) -> InputValidationError:
        err: dict[str, Any] = {"loc": ["body", field], "msg": msg, "type": type_}
        if value is not None:
            err["input"] = value
        return cls([err])


class ImageError(InputValidationError):
    """The image input could not be fetched, decoded or accepted (always about the ``image_url`` field)."""

    def __init__(self, msg: str, type_: str = "image_error") -> None:
        super().__init__([{"loc": ["body", "image_url"], "msg": msg, "type": type_}])


class Cancelled(NemotronFastError):
    """A request was cancelled; generation stopped after the block in flight."""
