"""The embedded default model: a tiny NLD-VLM trained here on procedurally drawn scenes.

- :mod:`~nemotron_fast.demo.scenes`: the seeded scene generator (images, descriptions, question-answer pairs);
- :mod:`~nemotron_fast.demo.tokenizer`: the small BPE trained on the scene corpus;
- :mod:`~nemotron_fast.demo.data` / :mod:`~nemotron_fast.demo.train`: the NLD joint objective on the inference
  model code (``python -m nemotron_fast.demo.train``);
- :mod:`~nemotron_fast.demo.eval`: held-out accuracy and decoding speed (``python -m nemotron_fast.demo.eval``);
- ``assets/``: the shipped checkpoint (``assets/model``) and an example scene (``example.png``, ``example.json``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path", "example_image_path", "example_qa", "ASSETS"]

ASSETS = Path(__file__).resolve().parent / "assets"


def default_model_path() -> Path:
    """Directory of the shipped demo checkpoint (``nemotron_fast/demo/assets/model``).

    Raises :class:`FileNotFoundError` when the package was installed without it.
    """
    path = ASSETS / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the demo checkpoint is not installed: {', '.join(missing)} missing in {path} "
                                "(train one with `python -m nemotron_fast.demo.train` and ship it with "
                                "`python -m nemotron_fast.demo.ship`)")
    return path


def example_image_path() -> Path:
    """The bundled example scene (``assets/example.png``)."""
    path = ASSETS / "example.png"
    if not path.is_file():
        raise FileNotFoundError(f"the demo example image is not installed: {path} is missing")
    return path


def example_qa() -> dict:
    """The example scene's description and question-answer pairs (``assets/example.json``)."""
    import json

    path = ASSETS / "example.json"
    if not path.is_file():
        raise FileNotFoundError(f"the demo example answers are not installed: {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))
