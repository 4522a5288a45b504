"""The ShapesWorld judge: finds the objects in any RGB image and names their shape and colour.

It plays the part of GenEval's object detector, for images that are rendered or generated. It is meant to be
tolerant (generated images are blurry and imperfect) but never generous: an object that is not clearly one
shape gets a low confidence, and a colour that is not clearly one of the palette's gets `None`.

Method, step by step:

1. Background: the median of the image's outer ring, refined by the median of every pixel close to it.
2. Coverage: each pixel is modelled as a mix `background + a * (colour - background)`. Its direction from
   the background tells which palette colour it belongs to (mixing with the background does not change the
   direction), and its projection on that colour's line gives `a`, the fraction of the pixel the object
   covers. Objects are the 4-connected components of `a >= 0.5`, re-thresholded with the coverage computed
   for each component's own colour: the half-coverage contour is where the true outline lies whatever the
   blur, so two objects 2 px apart stay apart after a blur of sigma 1 (and a component that still holds
   two objects falls apart at this second pass).
3. Colour: the median of the object's most saturated pixels, named by the nearest palette colour (RGB
   distance), or `None` when it is far from all of them or about as close to two of them.
4. Shape: rotation- and scale-invariant moments of the object's coverage map, classified by a Gaussian
   model per shape (`ShapeModel`, fitted on renders by `blip3o.world.judge_eval.fit_shape_model`). The
   harmonic moments `sum a (x + iy)^k` are unchanged by an isotropic blur, which is what keeps the judge
   working on blurry images.
5. Confidence: the product of three factors in [0, 1]: the margin of the best shape over the runner-up
   (ambiguous outlines score low), how typical the object is of the best shape (amorphous blobs score
   zero), and how plausible its size is.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .scene import COLOR_NAMES, COLORS, SHAPES, Box

SHAPE_MODEL_PATH = Path(__file__).with_name("data") / "judge_shape_model.json"

DEFAULT_MIN_CONFIDENCE = 0.5

# Segmentation.
NEAR_TIE_COSINE = 0.02  # palette directions this close (in cosine) to a pixel's best are treated as ties
SAME_COLOR_DISTANCE = 30.0  # RGB; pieces of one component further apart than this are different objects
MAX_SEGMENTATION_STEPS = 64  # bound on the regions examined per image (each step removes pixels)
COVERAGE_THRESHOLD = 0.5  # a pixel belongs to an object when the object covers at least half of it
MIN_COMPONENT_AREA = 20  # pixels; the smallest object (a 12 px star) covers about 50
MIN_CONTRAST = 20.0  # RGB distance between an object's colour and the background below which it is noise
BOX_COVERAGE = 0.35  # the coverage level at which box edges are placed (see subpixel_box)
MOMENT_WINDOW = 4  # px around a component whose (low) coverage still counts: a blur's tails carry the shape

# Plausible sizes: objects are drawn with boxes of 12 to 22 px. Measured boxes after the acceptance
# degradation or a warp: smaller side >= 9.5 px and larger side <= 25 px for 99.9% of objects.
PLAUSIBLE_EXTENT = (9.0, 26.0)
REJECTED_EXTENT = (7.0, 32.0)  # confidence falls linearly to zero at these extents

# Colour naming (RGB distances). The jitter alone moves a colour up to 21 from its nominal value, and the
# acceptance degradation up to about 32 (nearest/second ratio up to 0.41).
MAX_COLOR_DISTANCE = 60.0  # beyond this from every palette colour: not a palette colour
MAX_COLOR_DISTANCE_RATIO = 0.6  # nearest / second nearest above this: between two colours

# Shape confidence. Margin: log-likelihood ratio (nats) of the best shape over the runner-up; full confidence
# from CERTAIN_MARGIN. Fit: squared Mahalanobis distance to the best shape over its 99.5th percentile in
# fitting; full confidence up to TYPICAL_FIT, none from ATYPICAL_FIT (amorphous blobs land there).
CERTAIN_MARGIN = 10.0
TYPICAL_FIT, ATYPICAL_FIT = 0.75, 1.5


@dataclass(frozen=True)
class Detection:
    shape: str  # one of SHAPES
    color: str | None  # one of COLOR_NAMES, or None if the colour is not recognisable
    box: Box  # x0, y0, x1, y1 in pixels, like SceneObject.box
    confidence: float  # in [0, 1]


@dataclass(frozen=True)
class Candidate:
    """Everything the judge measured about one object, before any threshold on confidence."""

    box: Box
    rgb: tuple[float, float, float]  # the object's estimated colour
    color: str | None
    color_confidence: float  # see classify_color; not part of `confidence`
    features: np.ndarray  # see FEATURE_NAMES
    shape: str
    shape_confidence: float
    size_confidence: float

    @property
    def confidence(self) -> float:
        return self.shape_confidence * self.size_confidence

    def detection(self) -> Detection:
        return Detection(self.shape, self.color, self.box, self.confidence)


# ----------------------------------------------------------------------------------------------------------
# Input, background and coverage


def as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as a float32 array (H, W, 3) on the 0..255 scale."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8 and arr.size and float(arr.max()) <= 1.0:
        arr = arr * 255.0  # a float image on the 0..1 scale
    return arr.astype(np.float32)


def estimate_background(pixels: np.ndarray, ring: int = 2, near: float = 25.0) -> np.ndarray:
    """The background colour: median of the outer ring (objects cover little of it), then the median of all
    pixels near that first estimate (so objects touching the border cannot bias it)."""
    edge = np.concatenate(
        [
            pixels[:ring].reshape(-1, 3),
            pixels[-ring:].reshape(-1, 3),
            pixels[ring:-ring, :ring].reshape(-1, 3),
            pixels[ring:-ring, -ring:].reshape(-1, 3),
        ]
    )
    first = np.median(edge, axis=0)
    close = np.linalg.norm(pixels - first, axis=-1) < near
    return np.median(pixels[close], axis=0) if close.any() else first


_PALETTE_RGB = np.asarray([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)


def rough_coverage(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-pixel object coverage `a` in `background + a * (colour - background)`, for the palette colour whose
    direction from the background is closest to the pixel's own direction.

    Two palette colours can be almost collinear seen from some backgrounds (red and pink from a pink one): a
    pixel of full pink coverage then also reads as 40% red, and noise decides. Among such near-ties the larger
    coverage is kept, so that this rough estimate never cuts an object in pieces; `segment_objects` then
    recomputes the coverage with each object's own colour.
    """
    diff = pixels - background
    lines = _PALETTE_RGB - background  # (colours, 3)
    line_norms = np.maximum(np.linalg.norm(lines, axis=1), 1.0)
    projections = diff @ lines.T  # (H, W, colours)
    cosines = projections / (line_norms * (np.linalg.norm(diff, axis=-1, keepdims=True) + 1e-6))
    near_best = cosines >= cosines.max(axis=-1, keepdims=True) - NEAR_TIE_COSINE
    return np.where(near_best, projections / line_norms**2, -np.inf).max(axis=-1)


@dataclass(frozen=True)
class ObjectMask:
    mask: np.ndarray  # (H, W) bool: pixels the object covers at least half of
    rgb: np.ndarray  # (3,) its estimated colour


def segment_objects(pixels: np.ndarray, background: np.ndarray) -> list[ObjectMask]:
    """Split the image into objects: components of the rough coverage, each re-thresholded with the coverage
    computed for its own colour. A component that then falls apart (objects that touch after a blur) gives
    one object per piece, and a piece of another colour is re-examined with its own colour."""
    diff = pixels - background
    labels, n_labels = ndimage.label(rough_coverage(pixels, background) >= COVERAGE_THRESHOLD)
    pending = [labels == i for i in range(1, n_labels + 1)]
    claimed = np.zeros(labels.shape, dtype=bool)
    objects: list[ObjectMask] = []
    for _ in range(MAX_SEGMENTATION_STEPS):
        if not pending:
            break
        region = pending.pop()
        if region.sum() < MIN_COMPONENT_AREA:
            continue
        rgb = object_rgb(pixels, region, background)
        line = rgb - background
        if np.linalg.norm(line) < MIN_CONTRAST:
            continue
        own = diff @ line / (line @ line)
        # The rough mask may be a little short of the true outline (a near-tie resolved the other way): let
        # the object grow back into its neighbourhood, but never into another object.
        grown = ndimage.binary_dilation(region, iterations=2) & ~claimed
        pieces, n_pieces = ndimage.label((own >= COVERAGE_THRESHOLD) & grown)
        kept = np.zeros_like(claimed)
        for piece in (pieces == i for i in range(1, n_pieces + 1)):
            if piece.sum() < MIN_COMPONENT_AREA:
                continue
            piece_rgb = object_rgb(pixels, piece, background)
            if n_pieces > 1 and np.linalg.norm(piece_rgb - rgb) > SAME_COLOR_DISTANCE:
                pending.append(piece)  # another object, of another colour: threshold it with its own colour
                continue
            objects.append(ObjectMask(piece, piece_rgb))
            kept |= piece
        claimed |= kept
        if kept.any():
            # Whatever this region held besides the objects just found (another object, dimmer along this
            # colour's line) gets its own turn.
            leftover, n_left = ndimage.label(region & ~ndimage.binary_dilation(kept))
            pending += [leftover == i for i in range(1, n_left + 1)]
    return objects


# ----------------------------------------------------------------------------------------------------------
# Colour


def classify_color(rgb: Sequence[float]) -> tuple[str | None, float]:
    """Name an RGB colour with the palette: (name or None, confidence in [0, 1]).

    Plain RGB distances: objects are drawn with a uniform +-12 jitter per RGB channel, so RGB is where the
    world's own colour variation is round, and the midpoint of two palette colours is exactly as far from
    both (distance ratio 1). The name is None beyond MAX_COLOR_DISTANCE from every palette colour or when
    the nearest is not much nearer than the second (ratio above MAX_COLOR_DISTANCE_RATIO); confidence is 1
    within half of both limits and falls linearly to 0 at them.
    """
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    order = np.argsort(distances)
    nearest, second = float(distances[order[0]]), float(distances[order[1]])
    ratio = nearest / max(second, 1e-6)
    if nearest > MAX_COLOR_DISTANCE or ratio > MAX_COLOR_DISTANCE_RATIO:
        return None, 0.0
    by_distance = min(2.0 * (MAX_COLOR_DISTANCE - nearest) / MAX_COLOR_DISTANCE, 1.0)
    by_ratio = min(2.0 * (MAX_COLOR_DISTANCE_RATIO - ratio) / MAX_COLOR_DISTANCE_RATIO, 1.0)
    return COLOR_NAMES[order[0]], by_distance * by_ratio


def object_rgb(pixels: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The object's colour: median of its most saturated pixels (furthest from the background), which are the
    ones least mixed with the background by anti-aliasing or blur."""
    inside = pixels[mask]
    distance = np.linalg.norm(inside - background, axis=1)
    core = distance >= 0.9 * np.quantile(distance, 0.95)
    return np.median(inside[core], axis=0)


# ----------------------------------------------------------------------------------------------------------
# Shape

# Moments of the coverage map `a` around its centroid, z = (x - cx) + i (y - cy), normalised by the area
# A = sum(a) and the equivalent radius s = sqrt(A / pi) so that they do not depend on size:
#   spread  sum(a |z|^2) / (A s^2)      (1/2 for a disc; grows with blur, so it only helps on sharp images)
#   skew    |sum(a |z|^2 z)| / (A s^3)  (0 for any shape with 2-fold or higher symmetry; blur-invariant)
#   c2..c6  |sum(a z^k)| / (A s^k)      (k-fold symmetry: triangle 3 and 6, square and cross 4, star 5;
#                                        blur-invariant)
#   h2..h6  |sum(a r e^{ik theta})| / sum(a r)   (the same harmonics with less weight on far, noisy pixels)
#   c4_real Re(sum(a z^4)) / (A s^4)  (the orientation of the 4-fold pattern: the world turns shapes by at
#                                      most 20 degrees, so it is < 0 for a square, whose far mass lies on the
#                                      diagonals, and > 0 for a cross, whose arms lie on the axes; the
#                                      magnitudes c4 alone, 0.165 against 0.245, overlap after a blur)
# Measured and left out (no gain): the blur-invariant radial kurtosis and an edge-width (blur) estimate.
FEATURE_NAMES: tuple[str, ...] = (
    "spread", "skew", "c2", "c3", "c4", "c5", "c6", "h2", "h3", "h4", "h5", "h6", "c4_real",
)  # fmt: skip


def shape_features(coverage: np.ndarray) -> np.ndarray:
    """Rotation- and scale-invariant moments (FEATURE_NAMES) of one object's coverage map (zero elsewhere)."""
    ys, xs = np.nonzero(coverage != 0)
    weights = coverage[ys, xs].astype(np.float64)
    area = weights.sum()
    cx, cy = (weights * xs).sum() / area, (weights * ys).sum() / area
    z = (xs - cx) + 1j * (ys - cy)
    radius = np.abs(z)
    scale = math.sqrt(area / math.pi)

    def mean(values: np.ndarray) -> complex:
        return (weights * values).sum() / area

    values = {
        "spread": mean(radius**2).real / scale**2,
        "skew": abs(mean(radius**2 * z)) / scale**3,
        "c4_real": mean(z**4).real / scale**4,
    }
    for k in range(2, 7):
        values[f"c{k}"] = abs(mean(z**k)) / scale**k
    unit = np.where(radius > 0, z / np.maximum(radius, 1e-9), 0)
    radial_mass = (weights * radius).sum()
    for k in range(2, 7):
        values[f"h{k}"] = abs((weights * radius * unit**k).sum()) / radial_mass
    return np.asarray([values[name] for name in FEATURE_NAMES])


@dataclass(frozen=True)
class ShapeModel:
    """One Gaussian per shape over FEATURE_NAMES (after standardisation), fitted on rendered objects.

    `typical_distance[s]` is the 99.5th percentile of the squared Mahalanobis distance of the fitting objects of
    shape s to their own Gaussian: beyond it an object looks less and less like anything seen in fitting.
    """

    feature_names: tuple[str, ...]
    shapes: tuple[str, ...]
    offset: np.ndarray  # (F,) standardisation: (features - offset) / scale
    scale: np.ndarray  # (F,)
    means: np.ndarray  # (S, F)
    precisions: np.ndarray  # (S, F, F) inverse covariances
    log_dets: np.ndarray  # (S,)
    typical_distance: np.ndarray  # (S,)
    meta: dict

    def squared_distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each feature row (N, F) to each shape (N, S)."""
        x = (np.atleast_2d(features) - self.offset) / self.scale
        centred = x[:, None, :] - self.means[None]  # (N, S, F)
        return np.einsum("nsi,sij,nsj->ns", centred, self.precisions, centred)

    def classify(self, features: np.ndarray) -> tuple[str, float]:
        """(best shape, confidence in [0, 1]) for one feature vector."""
        distances = self.squared_distances(features)[0]
        log_likelihood = -0.5 * (distances + self.log_dets)
        order = np.argsort(log_likelihood)
        best, runner_up = order[-1], order[-2]
        margin = log_likelihood[best] - log_likelihood[runner_up]
        by_margin = min(margin / CERTAIN_MARGIN, 1.0)
        fit = distances[best] / self.typical_distance[best]
        by_fit = np.clip((ATYPICAL_FIT - fit) / (ATYPICAL_FIT - TYPICAL_FIT), 0.0, 1.0)
        return self.shapes[best], float(by_margin * by_fit)

    def to_json(self) -> dict:
        return {
            "feature_names": list(self.feature_names),
            "shapes": list(self.shapes),
            "offset": self.offset.tolist(),
            "scale": self.scale.tolist(),
            "means": self.means.tolist(),
            "precisions": self.precisions.tolist(),
            "log_dets": self.log_dets.tolist(),
            "typical_distance": self.typical_distance.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> ShapeModel:
        model = cls(
            feature_names=tuple(d["feature_names"]),
            shapes=tuple(d["shapes"]),
            offset=np.asarray(d["offset"]),
            scale=np.asarray(d["scale"]),
            means=np.asarray(d["means"]),
            precisions=np.asarray(d["precisions"]),
            log_dets=np.asarray(d["log_dets"]),
            typical_distance=np.asarray(d["typical_distance"]),
            meta=dict(d.get("meta", {})),
        )
        if model.feature_names != FEATURE_NAMES or set(model.shapes) != set(SHAPES):
            raise ValueError("the shape model was fitted for other features or shapes: refit it")
        return model


@functools.cache
def load_shape_model(path: Path = SHAPE_MODEL_PATH) -> ShapeModel:
    return ShapeModel.from_json(json.loads(Path(path).read_text()))


def _first_crossing(profile: np.ndarray, level: float) -> float:
    """Where a coverage profile over pixels first reaches `level`, interpolating linearly between pixel
    centres (pixel i spans [i, i + 1], its centre is i + 0.5); 0 when the first pixel already does."""
    i = int(np.argmax(profile >= level))
    if i == 0:
        return 0.0
    below, above = profile[i - 1], profile[i]
    return float(i - 0.5 + (level - below) / (above - below))


def subpixel_box(coverage: np.ndarray, mask: np.ndarray) -> Box:
    """Bounding box (x0, y0, x1, y1) of one object from its coverage map (zero away from the object) and its
    mask (pixels it covers at least half of, which always count as reaching the cut level).

    Along each axis the profile of maximum coverage is cut at BOX_COVERAGE with linear interpolation: for a
    straight anti-aliased edge the coverage profile crosses 1/2 exactly at the edge, but tips and corners
    never reach full coverage in their last pixel and a blur lowers them further, so a lower level matches
    the drawn extents best (measured: mean |edge error| 0.2 px clean, 0.5 px after the acceptance blur).
    """
    coverage = np.where(mask, np.maximum(coverage, BOX_COVERAGE), coverage)
    by_column, by_row = coverage.max(axis=0), coverage.max(axis=1)
    width, height = len(by_column), len(by_row)
    return (
        _first_crossing(by_column, BOX_COVERAGE),
        _first_crossing(by_row, BOX_COVERAGE),
        width - _first_crossing(by_column[::-1], BOX_COVERAGE),
        height - _first_crossing(by_row[::-1], BOX_COVERAGE),
    )


def size_confidence(width: float, height: float) -> float:
    """1 for plausible box extents, falling linearly to 0 at REJECTED_EXTENT."""
    (lo_ok, hi_ok), (lo_bad, hi_bad) = PLAUSIBLE_EXTENT, REJECTED_EXTENT
    small, large = min(width, height), max(width, height)
    factor_small = np.clip((small - lo_bad) / (lo_ok - lo_bad), 0.0, 1.0)
    factor_large = np.clip((hi_bad - large) / (hi_bad - hi_ok), 0.0, 1.0)
    return float(factor_small * factor_large)


# ----------------------------------------------------------------------------------------------------------
# Detection


def find_candidates(image: Image.Image | np.ndarray, model: ShapeModel | None = None) -> list[Candidate]:
    """Every connected component that could be an object, measured and classified, in no particular order.

    With `model=None` the shape fields are placeholders (used while fitting the model itself).
    """
    pixels = as_pixels(image)
    background = estimate_background(pixels)
    objects = segment_objects(pixels, background)
    if not objects:
        return []
    labels = np.zeros(pixels.shape[:2], dtype=np.int32)
    for index, obj in enumerate(objects, start=1):
        labels[obj.mask] = index
    # Each background pixel goes to its nearest object, so that a neighbour's blurred edge never lands in
    # another object's moment window.
    distance, (near_y, near_x) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    nearest_label = labels[near_y, near_x]
    diff = pixels - background
    candidates = []
    for index, obj in enumerate(objects, start=1):
        colour_line = obj.rgb - background
        coverage = np.clip(diff @ colour_line / (colour_line @ colour_line), 0.0, 1.0)
        window = (nearest_label == index) & (distance <= MOMENT_WINDOW)
        features = shape_features(np.where(window, coverage, 0.0))
        # The box looks no further than 2 px out, where a stray noisy pixel cannot stretch it.
        near_object = ndimage.binary_dilation(obj.mask, iterations=2) & window
        box = subpixel_box(np.where(near_object, coverage, 0.0), obj.mask)
        x0, y0, x1, y1 = box
        color, color_confidence = classify_color(obj.rgb)
        shape, shape_confidence = ("circle", 0.0) if model is None else model.classify(features)
        candidates.append(
            Candidate(
                box=box,
                rgb=tuple(float(v) for v in obj.rgb),
                color=color,
                color_confidence=color_confidence,
                features=features,
                shape=shape,
                shape_confidence=shape_confidence,
                size_confidence=size_confidence(x1 - x0, y1 - y0),
            )
        )
    return candidates


def detections_of(
    candidates: Iterable[Candidate], min_confidence: float = DEFAULT_MIN_CONFIDENCE
) -> list[Detection]:
    """The candidates with confidence >= min_confidence as detections, most confident first (what `detect`
    returns; for a caller that also reads the rejected candidates)."""
    found = [c.detection() for c in candidates if c.confidence >= min_confidence]
    return sorted(found, key=lambda d: (-d.confidence, d.box))


def detect(
    image: Image.Image | np.ndarray, min_confidence: float = DEFAULT_MIN_CONFIDENCE
) -> list[Detection]:
    """The objects in an RGB image with confidence >= min_confidence, most confident first."""
    return detections_of(find_candidates(image, load_shape_model()), min_confidence)


def detect_batch(
    images: Iterable[Image.Image | np.ndarray], min_confidence: float = DEFAULT_MIN_CONFIDENCE
) -> list[list[Detection]]:
    return [detect(image, min_confidence) for image in images]
