"""Copy a trained run into the package: ``python -m nemotron_fast.demo.ship RUN_DIR``.

Writes ``nemotron_fast/demo/assets/model/`` (only the real checkpoint layout: config files, ``model.safetensors``,
tokenizer files; no optimizer state) and the example scene ``assets/example.png`` with its description and
question-answer pairs in ``assets/example.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from . import ASSETS
from .scenes import Scene, make_scene, scene_seed

__all__ = ["CHECKPOINT_FILES", "ship_checkpoint", "write_example", "pick_example", "main"]

CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# A size cap the package promises (issue 3): the shipped checkpoint stays small enough to live in the wheel.
MAX_CHECKPOINT_BYTES = 25 * 2**20


def ship_checkpoint(run: Path, dest: Path) -> int:
    """Copy the checkpoint files of ``run`` into ``dest`` (replaced); returns their total size in bytes."""
    missing = [f for f in CHECKPOINT_FILES if not (run / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} is not a finished run: {', '.join(missing)} missing")
    total = sum((run / f).stat().st_size for f in CHECKPOINT_FILES)
    if total > MAX_CHECKPOINT_BYTES:
        cap = MAX_CHECKPOINT_BYTES / 2**20
        raise ValueError(f"the checkpoint is {total / 2**20:.1f} MiB, over the {cap:.0f} MiB cap")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in CHECKPOINT_FILES:
        shutil.copyfile(run / f, dest / f)
    return total


def pick_example(start: int = 0) -> Scene:
    """The first ``example`` scene from ``start`` with three objects of three different shapes and colours, so
    every question template applies to it."""
    i = start
    while True:
        s = make_scene(scene_seed("example", 0, i))
        if len(s.objects) == 3 and len({o.shape for o in s.objects}) == 3 and len({o.colour for o in s.objects}) == 3:
            return s
        i += 1


def write_example(scene: Scene, dest: Path) -> None:
    """Write ``example.png`` and ``example.json`` (seed, description, questions with answers) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    scene.image.save(dest / "example.png", optimize=True)
    doc = {
        "seed": scene.seed,
        "description": scene.caption,
        "description_prompt": "Describe the image.",
        "qa": [{"question": qa.question, "answer": qa.answer, "kind": qa.kind} for qa in scene.qa],
        "objects": [asdict(o) for o in scene.objects],
        "background": scene.background,
    }
    (dest / "example.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m nemotron_fast.demo.ship", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished training run directory")
    ap.add_argument("--assets", type=Path, default=ASSETS)
    a = ap.parse_args(argv)
    size = ship_checkpoint(a.run, a.assets / "model")
    write_example(pick_example(), a.assets)
    print(json.dumps({"model": str(a.assets / "model"), "bytes": size, "example": str(a.assets / "example.png")}))


if __name__ == "__main__":
    main()
