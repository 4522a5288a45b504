"""ShapesWorld v1: the vocabulary, the scene graph and the spatial relation rule.

A scene is a flat-coloured 64x64 canvas holding 1 to 4 coloured shapes. Everything else in the world
(rendering, language, prompts, the judges) is a function of the `Scene` defined here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}

# Nominal colours (sRGB, 0..255). Chosen to be far apart from each other and from every possible background
# (each background channel lies in [200, 255]); objects are rendered with +-12 jitter per channel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (245, 130, 15),
    "yellow": (240, 210, 20),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (245, 110, 180),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_BOX, MAX_BOX = 12.0, 22.0  # bounding-box extent of every object, pixels, both axes
MIN_GAP = 2.0  # bounding boxes are at least this far apart (pixels) along some axis
MAX_ROTATION = 20.0  # degrees, for every shape except the circle
COLOR_JITTER = 12  # per channel
BACKGROUND_RANGE = (200, 255)  # per channel
MAX_NOISE_STD = 3.0

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
POSITION_THRESHOLD = 0.1  # GenEval's margin: 0.1 x (sum of the two boxes' extents)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; image y grows downward


@dataclass(frozen=True)
class SceneObject:
    """One shape on the canvas. `box` is the axis-aligned bounding box of the drawn shape."""

    shape: str
    color: str
    rgb: tuple[int, int, int]  # the jittered colour actually drawn
    center: tuple[float, float]  # x, y (pixels)
    rotation: float  # degrees, counter-clockwise; 0 for circles
    scale: float  # pixels per unit of the shape's template (see render.py)
    box: Box

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class Scene:
    """A scene graph: background, noise and objects. Rendering it is deterministic (render.py)."""

    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    noise_std: float = 0.0
    noise_seed: int = 0
    size: int = IMAGE_SIZE
    meta: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = tuple(
            SceneObject(
                shape=o["shape"],
                color=o["color"],
                rgb=tuple(o["rgb"]),
                center=tuple(o["center"]),
                rotation=float(o["rotation"]),
                scale=float(o["scale"]),
                box=tuple(o["box"]),
            )
            for o in d["objects"]
        )
        return cls(
            background=tuple(d["background"]),
            objects=objects,
            noise_std=float(d.get("noise_std", 0.0)),
            noise_seed=int(d.get("noise_seed", 0)),
            size=int(d.get("size", IMAGE_SIZE)),
            meta=dict(d.get("meta", {})),
        )


def box_gap(a: Box, b: Box) -> float:
    """Separation of two boxes: the larger of the x gap and the y gap (negative when they overlap)."""
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    return max(gap_x, gap_y)


def relations_between(box_a: Box, box_b: Box) -> set[str]:
    """Relations that hold for A relative to B, with GenEval's rule.

    Offset between box centres (A minus B), each axis shrunk toward zero by 0.1 x the sum of the two
    boxes' extents on that axis, divided by the length of the unshrunk offset. A is left of B where the x
    component is below -0.5, right of where above 0.5, above where y is below -0.5 (y grows downward),
    below where above 0.5.
    """
    cax, cay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    cbx, cby = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    off_x, off_y = cax - cbx, cay - cby
    dims_x = (box_a[2] - box_a[0]) + (box_b[2] - box_b[0])
    dims_y = (box_a[3] - box_a[1]) + (box_b[3] - box_b[1])
    rev_x = math.copysign(max(abs(off_x) - POSITION_THRESHOLD * dims_x, 0.0), off_x)
    rev_y = math.copysign(max(abs(off_y) - POSITION_THRESHOLD * dims_y, 0.0), off_y)
    if abs(rev_x) < 1e-3 and abs(rev_y) < 1e-3:
        return set()
    norm = math.hypot(off_x, off_y)
    dx, dy = rev_x / norm, rev_y / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else SHAPE_PLURALS[shape]
