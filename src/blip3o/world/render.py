"""Rendering ShapesWorld scenes: anti-aliased by 4x supersampling with a box filter, bit-exact per scene."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .scene import Box, Scene, SceneObject

SUPERSAMPLE = 4


def _regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star() -> list[tuple[float, float]]:
    # Five-pointed, first point straight up (y grows downward). Inner radius 0.45 (a regular pentagram has
    # 0.38): slightly fatter arms survive being drawn 12 px wide.
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _cross(arm: float = 0.36) -> list[tuple[float, float]]:
    # Plus sign spanning [-1, 1] on both axes; arms `arm` wide (in units of the half-span).
    h = arm
    return [
        (-h, -1), (h, -1), (h, -h), (1, -h), (1, h), (h, h),
        (h, 1), (-h, 1), (-h, h), (-1, h), (-1, -h), (-h, -h),
    ]  # fmt: skip


# Shape templates: polygons in unit coordinates centred on the origin.
TEMPLATES: dict[str, list[tuple[float, float]]] = {
    "circle": _regular(96, 1.0, 0.0),
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": _regular(3, 1.0, -math.pi / 2),  # equilateral, apex up
    "star": _star(),
    "cross": _cross(),
}


def shape_polygon(
    shape: str, center: tuple[float, float], scale: float, rotation: float
) -> list[tuple[float, float]]:
    """The shape's outline in pixel coordinates. `rotation` is counter-clockwise in degrees on screen."""
    a = math.radians(rotation)
    cos_a, sin_a = math.cos(a), math.sin(a)
    cx, cy = center
    # y grows downward, so a counter-clockwise turn on screen is a clockwise turn in (x, y) maths coordinates.
    return [
        (cx + scale * (x * cos_a + y * sin_a), cy + scale * (-x * sin_a + y * cos_a))
        for x, y in TEMPLATES[shape]
    ]


def polygon_box(points: list[tuple[float, float]]) -> Box:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def unit_extent(shape: str, rotation: float) -> tuple[float, float]:
    """Width and height of the shape's box at scale 1 (used to pick a scale that meets the box-size rule)."""
    x0, y0, x1, y1 = polygon_box(shape_polygon(shape, (0.0, 0.0), 1.0, rotation))
    return x1 - x0, y1 - y0


def make_object(
    shape: str,
    color: str,
    rgb: tuple[int, int, int],
    center: tuple[float, float],
    scale: float,
    rotation: float,
) -> SceneObject:
    box = polygon_box(shape_polygon(shape, center, scale, rotation))
    return SceneObject(shape, color, rgb, center, rotation, scale, box)


def render_object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object on a size x size canvas, shape (size, size) float32."""
    ss = SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    poly = [(x * ss, y * ss) for x, y in shape_polygon(obj.shape, obj.center, obj.scale, obj.rotation)]
    ImageDraw.Draw(canvas).polygon(poly, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene) -> Image.Image:
    """Render a scene to a size x size RGB image, deterministically."""
    size = scene.size
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(scene.background, dtype=np.float32)
    for obj in scene.objects:
        cov = render_object_mask(obj, size)[..., None]  # (H, W, 1)
        img = img * (1.0 - cov) + np.asarray(obj.rgb, dtype=np.float32) * cov
    if scene.noise_std > 0:
        rng = np.random.default_rng(scene.noise_seed)
        img = img + rng.normal(0.0, scene.noise_std, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
