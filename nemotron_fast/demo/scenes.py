"""Seeded toy scenes: a few coloured shapes on a varied background, drawn with PIL, plus the text derived from
them (a one-sentence description and question-answer pairs).

Every sentence is computed from the scene's object list, never written by hand, so the answers are right by
construction. A scene is a pure function of its seed string; training and evaluation draw from disjoint
namespaces (``train:<seed>:<i>`` and ``eval:<seed>:<i>``), so an evaluation scene is never a training scene's seed.

Geometry: the image is a 4 x 4 grid of 28-pixel cells, the area one image token sees (patch 14, spatial merge 2).
Each shape sits inside one cell (centre jittered by a pixel, half-size 9..12 px) and no two shapes share a column,
so shapes never overlap, "left of" is unambiguous, and one image token holds one whole shape - which makes the
scenes learnable by a tiny vision tower trained from scratch in minutes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "CELL",
    "GRID",
    "COLOURS",
    "SHAPES",
    "BACKGROUNDS",
    "NUMBER_WORDS",
    "SceneObject",
    "Scene",
    "QA",
    "make_scene",
    "scene_seed",
    "describe",
    "questions",
    "DESCRIBE_PROMPTS",
]

IMAGE_SIZE = 112
# Flat fill colours; each object gets a small per-object jitter so a colour is a region, not one RGB value.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 236),
    "gray": (128, 128, 132),
    "black": (22, 22, 26),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
DESCRIBE_PROMPTS: tuple[str, ...] = ("Describe the image.", "Describe the image in one sentence.",
                                     "What is in this image?")
CELL = 28
GRID = IMAGE_SIZE // CELL
_MAX_OBJECTS = GRID
_R_MIN, _R_MAX = 9, 12
_JITTER_XY = 1
_JITTER = 12


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: ``r`` is the half-size in pixels, ``(x, y)`` the centre, ``rgb`` the exact fill."""

    shape: str
    colour: str
    x: int
    y: int
    r: int
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class QA:
    """A question about a scene and its answer; ``kind`` names the template (``colour_of``, ``count_shape``...)."""

    kind: str
    question: str
    answer: str


@dataclass
class Scene:
    """A drawn scene: the image, the objects (left to right), the background name and the derived text."""

    image: Image.Image
    objects: list[SceneObject]
    background: str
    seed: str
    caption: str = ""
    qa: list[QA] = field(default_factory=list)


def scene_seed(split: str, seed: int, index: int) -> str:
    """The seed string of scene ``index`` of a ``split`` (``train`` or ``eval``) drawn with run seed ``seed``."""
    if split not in ("train", "eval", "example"):
        raise ValueError(f"split must be 'train', 'eval' or 'example', got {split!r}")
    return f"{split}:{seed}:{index}"


def _shape_polygon(shape: str, x: int, y: int, r: int) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x + r * math.cos(a), y - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), y - rad * math.sin(a)))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_background(rng: random.Random, name: str) -> Image.Image:
    """Base colour with a random linear gradient and pixel noise, so backgrounds vary within a name."""
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle))[..., None] * rng.uniform(0, 36)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 6), (n, n, 3))
    img = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def _sample_objects(rng: random.Random) -> list[SceneObject]:
    n = rng.randint(1, _MAX_OBJECTS)
    columns = rng.sample(range(GRID), n)
    objs: list[SceneObject] = []
    for col in columns:
        # repeats are drawn on purpose so "how many" and plural descriptions get answers above one
        if objs and rng.random() < 0.35:
            src = rng.choice(objs)
            shape = src.shape
            colour = src.colour if rng.random() < 0.6 else rng.choice(list(COLOURS))
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        row = rng.randrange(GRID)
        x = col * CELL + CELL // 2 + rng.randint(-_JITTER_XY, _JITTER_XY)
        y = row * CELL + CELL // 2 + rng.randint(-_JITTER_XY, _JITTER_XY)
        r = rng.randint(_R_MIN, _R_MAX)
        rgb = tuple(int(np.clip(c + rng.randint(-_JITTER, _JITTER), 0, 255)) for c in COLOURS[colour])
        objs.append(SceneObject(shape, colour, x, y, r, rgb))  # type: ignore[arg-type]
    return sorted(objs, key=lambda o: o.x)


def _draw(rng: random.Random, objs: list[SceneObject], background: str) -> Image.Image:
    img = _draw_background(rng, background)
    d = ImageDraw.Draw(img)
    for o in objs:
        if o.shape == "circle":
            d.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=o.rgb)
        else:
            d.polygon(_shape_polygon(o.shape, o.x, o.y, o.r), fill=o.rgb)
    return img


def _a(word: str) -> str:
    """The indefinite article for ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def describe(objects: list[SceneObject], background: str) -> str:
    """One sentence: the count and the background, then every shape from left to right.

    e.g. ``"Three shapes on a white background: a red circle, a blue star and a red circle."`` The fixed order
    (global facts first, then a left-to-right scan) makes every word a function of the image alone.
    """
    n = len(objects)
    items = [f"{_a(o.colour)} {o.name}" for o in objects]
    body = items[0] if n == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{NUMBER_WORDS[n].capitalize()} {_plural('shape', n)} on a {background} background: {body}."


def questions(rng: random.Random, objects: list[SceneObject]) -> list[QA]:
    """Every question template that is well defined for the scene, with answers computed from ``objects``.

    Templates whose subject is ambiguous in this scene (e.g. "the circle" when there are two) are skipped.
    """
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    names = [o.name for o in objects]
    out: list[QA] = []
    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    if unique_shapes:
        s = rng.choice(unique_shapes)
        out.append(QA("colour_of", f"What colour is the {s}?", objects[shapes.index(s)].colour))
    unique_colours = [c for c in COLOURS if colours.count(c) == 1]
    if unique_colours:
        c = rng.choice(unique_colours)
        out.append(QA("shape_of", f"What shape is the {c} object?", objects[colours.index(c)].shape))
    s = rng.choice(SHAPES)
    out.append(QA("count_shape", f"How many {s}s are there?", NUMBER_WORDS[shapes.count(s)]))
    out.append(QA("count_all", "How many shapes are there?", NUMBER_WORDS[len(objects)]))
    if rng.random() < 0.5:
        o = rng.choice(objects)
        c, s = o.colour, o.shape
    else:
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    out.append(QA("exists", f"Is there {_a(c)} {c} {s}?", "yes" if f"{c} {s}" in names else "no"))
    unique_names = [i for i, nm in enumerate(names) if names.count(nm) == 1]
    if unique_names:
        # objects are sorted by x and sit in distinct grid columns, so the neighbours are well defined
        i = rng.choice(unique_names)
        left = f"the {names[i - 1]}" if i > 0 else "nothing"
        right = f"the {names[i + 1]}" if i + 1 < len(objects) else "nothing"
        if rng.random() < 0.5:
            out.append(QA("left_of", f"What is left of the {names[i]}?", left))
        else:
            out.append(QA("right_of", f"What is right of the {names[i]}?", right))
    return out


def make_scene(seed: str) -> Scene:
    """Draw the scene of a seed string (see :func:`scene_seed`) with its description and questions."""
    rng = random.Random(seed)
    objs = _sample_objects(rng)
    background = rng.choice(list(BACKGROUNDS))
    img = _draw(rng, objs, background)
    return Scene(img, objs, background, seed, describe(objs, background), questions(rng, objs))
