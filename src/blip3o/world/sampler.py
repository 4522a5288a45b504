"""Sampling ShapesWorld scenes: free (random) or from a list of required objects and a constraint.

Determinism: every function takes a `numpy.random.Generator`; the same generator state gives the same scene.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .render import make_object, unit_extent
from .scene import (
    BACKGROUND_RANGE,
    COLOR_JITTER,
    COLOR_NAMES,
    COLORS,
    MAX_BOX,
    MAX_NOISE_STD,
    MAX_OBJECTS,
    MAX_ROTATION,
    MIN_BOX,
    MIN_GAP,
    MIN_OBJECTS,
    SHAPES,
    Scene,
    SceneObject,
    box_gap,
)


@dataclass(frozen=True)
class ObjectSpec:
    """What an object must be; None means 'any'."""

    shape: str | None = None
    color: str | None = None


class SceneSamplingError(RuntimeError):
    """No scene satisfying the request was found within the attempt budget."""


def jitter_color(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    """The RGB an object of a named colour is drawn in: the palette's, each channel moved by up to COLOR_JITTER."""
    base = np.asarray(COLORS[color])
    jit = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(base + jit, 0, 255))


def _sample_object(rng: np.random.Generator, spec: ObjectSpec, size: int) -> SceneObject:
    shape = spec.shape or SHAPES[rng.integers(len(SHAPES))]
    color = spec.color or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    rotation = 0.0 if shape == "circle" else float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    w1, h1 = unit_extent(shape, rotation)
    # The scale range that keeps both box extents within [MIN_BOX, MAX_BOX].
    lo, hi = MIN_BOX / min(w1, h1), MAX_BOX / max(w1, h1)
    scale = float(rng.uniform(lo, hi)) * (1 - 1e-6)
    half_w, half_h = w1 * scale / 2, h1 * scale / 2
    cx = float(rng.uniform(half_w, size - half_w))
    cy = float(rng.uniform(half_h, size - half_h))
    return keep_inside(make_object(shape, color, jitter_color(rng, color), (cx, cy), scale, rotation), size)


def keep_inside(obj: SceneObject, size: int) -> SceneObject:
    """`obj` moved, if need be, so that its box lies fully inside a size x size canvas (the box is computed from
    the polygon, which need not be centred on the object's anchor)."""
    dx = max(0.0, -obj.box[0]) - max(0.0, obj.box[2] - size)
    dy = max(0.0, -obj.box[1]) - max(0.0, obj.box[3] - size)
    if not (dx or dy):
        return obj
    center = (obj.center[0] + dx, obj.center[1] + dy)
    return make_object(obj.shape, obj.color, obj.rgb, center, obj.scale, obj.rotation)


def _place(
    rng: np.random.Generator, specs: Sequence[ObjectSpec], size: int, tries_per_object: int = 200
) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    for spec in specs:
        for _ in range(tries_per_object):
            cand = _sample_object(rng, spec, size)
            if all(box_gap(cand.box, o.box) >= MIN_GAP for o in placed):
                placed.append(cand)
                break
        else:
            return None
    return placed


def sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A scene's background colour, each channel uniform in BACKGROUND_RANGE."""
    lo, hi = BACKGROUND_RANGE
    return tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))


def sample_scene(
    rng: np.random.Generator,
    specs: Sequence[ObjectSpec] | None = None,
    constraint: Callable[[Sequence[SceneObject]], bool] | None = None,
    noise: bool = True,
    size: int = 64,
    max_attempts: int = 500,
) -> Scene:
    """Sample a scene.

    specs: the objects to place, in order (shape/colour may be None for 'any'). None: 1 to 4 random objects.
    constraint: a predicate the placed objects must satisfy (e.g. a spatial relation); resampled until true.
    noise: draw a per-image Gaussian noise std in [0, MAX_NOISE_STD] (else no noise).
    """
    if specs is not None and not MIN_OBJECTS <= len(specs) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds {MIN_OBJECTS} to {MAX_OBJECTS} objects, got {len(specs)}")
    for _ in range(max_attempts):
        background = sample_background(rng)
        n_specs = specs
        if n_specs is None:
            n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
            n_specs = [ObjectSpec()] * n
        objects = _place(rng, n_specs, size)
        if objects is None or (constraint is not None and not constraint(objects)):
            continue
        noise_std = float(rng.uniform(0.0, MAX_NOISE_STD)) if noise else 0.0
        noise_seed = int(rng.integers(2**31 - 1))
        return Scene(background, tuple(objects), noise_std, noise_seed, size)
    raise SceneSamplingError(f"no scene satisfying the request after {max_attempts} attempts: specs={specs}")
