"""Measuring the judge (judge.py) on ShapesWorld renders, and fitting its shape model.

    python -m blip3o.world.judge_eval            # print every measurement (a few minutes on one core)
    python -m blip3o.world.judge_eval --refit    # refit data/judge_shape_model.json, then measure

Perturbations stand in for generated images. `degrade` is the acceptance one: a Gaussian blur of sigma 1 px
(scipy.ndimage.gaussian_filter per channel, edges replicated), additive Gaussian noise of std 8 on the 0..255
scale, rounding to uint8 and a JPEG round trip at quality 75 through PIL (its default 4:2:0 chroma
subsampling). The harder conditions blur more and add a small smooth elastic warp.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from . import judge
from .render import SUPERSAMPLE, render
from .sampler import ObjectSpec, sample_scene
from .scene import BACKGROUND_RANGE, COLOR_NAMES, COLORS, IMAGE_SIZE, SHAPES, Box, Scene, box_gap

# ----------------------------------------------------------------------------------------------------------
# Perturbations


def perturb(
    image: Image.Image,
    rng: np.random.Generator,
    blur_sigma: float = 0.0,
    noise_std: float = 0.0,
    jpeg_quality: int | None = None,
    elastic_px: float = 0.0,
    elastic_smoothness: float = 4.0,
) -> Image.Image:
    """Warp (smooth random displacement field of RMS `elastic_px`, correlated over `elastic_smoothness` px),
    blur, add noise, round to uint8, then JPEG round trip; each step only when asked for."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if elastic_px > 0:
        size_y, size_x = pixels.shape[:2]
        fields = []
        for _ in range(2):
            field = ndimage.gaussian_filter(rng.normal(size=(size_y, size_x)), elastic_smoothness)
            fields.append(field * elastic_px / (field.std() + 1e-12))
        grid_y, grid_x = np.mgrid[0:size_y, 0:size_x].astype(np.float64)
        coords = [grid_y + fields[0], grid_x + fields[1]]
        pixels = np.stack(
            [ndimage.map_coordinates(pixels[..., c], coords, order=1, mode="nearest") for c in range(3)], -1
        )
    if blur_sigma > 0:
        pixels = np.stack(
            [ndimage.gaussian_filter(pixels[..., c], blur_sigma, mode="nearest") for c in range(3)], -1
        )
    if noise_std > 0:
        pixels = pixels + rng.normal(0.0, noise_std, size=pixels.shape)
    out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=jpeg_quality)
        buffer.seek(0)
        out = Image.open(buffer).convert("RGB")
    return out


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The acceptance degradation: blur sigma 1 (scipy), noise std 8/255, JPEG quality 75."""
    return perturb(image, rng, blur_sigma=1.0, noise_std=8.0, jpeg_quality=75)


Perturbation = Callable[[Image.Image, np.random.Generator], Image.Image]

CONDITIONS: dict[str, Perturbation] = {
    "clean": lambda image, rng: image,
    "degraded": degrade,
    "blur1.5": lambda image, rng: perturb(image, rng, blur_sigma=1.5, noise_std=8.0, jpeg_quality=75),
    "blur2": lambda image, rng: perturb(image, rng, blur_sigma=2.0, noise_std=8.0, jpeg_quality=75),
    "elastic0.5+blur1.5": lambda image, rng: perturb(
        image, rng, elastic_px=0.5, blur_sigma=1.5, noise_std=8.0, jpeg_quality=75
    ),
    "elastic1+blur1": lambda image, rng: perturb(
        image, rng, elastic_px=1.0, blur_sigma=1.0, noise_std=8.0, jpeg_quality=75
    ),
    # Used in fitting only (a mild warp, so that the shape model tolerates imperfect outlines).
    "elastic0.5+blur1": lambda image, rng: perturb(
        image, rng, elastic_px=0.5, blur_sigma=1.0, noise_std=8.0, jpeg_quality=75
    ),
}
EVAL_CONDITIONS: tuple[str, ...] = (
    "clean", "degraded", "blur1.5", "blur2", "elastic0.5+blur1.5", "elastic1+blur1",
)  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# Matching detections to the scene's objects


def box_iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(truth: list[Box], found: list[Box], min_iou: float = 0.3) -> list[tuple[int, int, float]]:
    """One-to-one matching maximising total IoU: (truth index, found index, IoU) with IoU >= min_iou."""
    if not truth or not found:
        return []
    iou = np.array([[box_iou(t, f) for f in found] for t in truth])
    rows, cols = linear_sum_assignment(-iou)
    return [
        (int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou
    ]


# ----------------------------------------------------------------------------------------------------------
# Object-level accuracy


@dataclass
class JudgeReport:
    condition: str
    images: int = 0
    objects: int = 0
    matched: int = 0
    shape_correct: int = 0
    color_correct: int = 0
    color_none: int = 0
    count_correct: int = 0
    spurious: int = 0  # confident detections matching no object
    merged: int = 0  # objects whose component also holds another object's centre
    iou_sum: float = 0.0
    edge_error_sum: float = 0.0  # mean |error| of the four box edges, summed over matched objects
    seconds: float = 0.0  # spent inside the judge
    confusion: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((len(SHAPES), len(SHAPES) + 1), dtype=int)
    )  # rows: true shape; columns: reported shape, then 'missed'

    def rates(self) -> dict[str, float]:
        per_object = max(self.objects, 1)
        return {
            "shape_acc": self.shape_correct / per_object,
            "color_acc": self.color_correct / per_object,
            "count_acc": self.count_correct / max(self.images, 1),
            "recall": self.matched / per_object,
            "mean_iou": self.iou_sum / max(self.matched, 1),
            "mean_edge_error_px": self.edge_error_sum / max(self.matched, 1),
            "color_none_rate": self.color_none / per_object,
            "spurious_per_image": self.spurious / max(self.images, 1),
            "merge_rate": self.merged / per_object,
            "images_per_s": self.images / max(self.seconds, 1e-9),
        }

    def summary(self) -> str:
        r = self.rates()
        return (
            f"{self.condition:>20s}: shape {r['shape_acc']:.4f}  colour {r['color_acc']:.4f}  "
            f"count {r['count_acc']:.4f}  recall {r['recall']:.4f}  IoU {r['mean_iou']:.3f}  "
            f"edge err {r['mean_edge_error_px']:.2f}px  colour None {r['color_none_rate']:.4f}  "
            f"spurious/img {r['spurious_per_image']:.4f}  merges {r['merge_rate']:.4f}  "
            f"({self.objects} objects, {self.images} images, {r['images_per_s']:.0f} img/s)"
        )


def _centre_inside(box: Box, point: tuple[float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def score_image(report: JudgeReport, scene: Scene, image: Image.Image, min_confidence: float) -> None:
    """Run the judge on one image and add the outcome to `report`."""
    start = time.perf_counter()
    detections = judge.detect(image, min_confidence=min_confidence)
    report.seconds += time.perf_counter() - start
    truth = [o.box for o in scene.objects]
    matches = match_boxes(truth, [d.box for d in detections])
    report.images += 1
    report.objects += len(truth)
    report.count_correct += len(detections) == len(truth)
    report.spurious += len(detections) - len(matches)
    matched_truth = set()
    for t, f, iou in matches:
        obj, det = scene.objects[t], detections[f]
        matched_truth.add(t)
        report.matched += 1
        report.iou_sum += iou
        report.edge_error_sum += float(np.mean(np.abs(np.subtract(obj.box, det.box))))
        report.shape_correct += det.shape == obj.shape
        report.color_correct += det.color == obj.color
        report.color_none += det.color is None
        report.confusion[SHAPES.index(obj.shape), SHAPES.index(det.shape)] += 1
        others = [o.center for i, o in enumerate(scene.objects) if i != t]
        report.merged += any(_centre_inside(det.box, c) for c in others)
    for t, obj in enumerate(scene.objects):
        if t not in matched_truth:
            report.confusion[SHAPES.index(obj.shape), len(SHAPES)] += 1


def judge_accuracy(
    n: int,
    seed: int,
    degrade: bool = False,
    condition: str | None = None,
    min_confidence: float = judge.DEFAULT_MIN_CONFIDENCE,
) -> JudgeReport:
    """Object-level accuracy of the judge on `n` random scenes (1 to 4 objects), clean or perturbed.

    `degrade=True` is the acceptance degradation; `condition` picks any entry of CONDITIONS instead.
    """
    condition = condition or ("degraded" if degrade else "clean")
    perturbation = CONDITIONS[condition]
    rng = np.random.default_rng(seed)
    report = JudgeReport(condition)
    for _ in range(n):
        scene = sample_scene(rng)
        score_image(report, scene, perturbation(render(scene), rng), min_confidence)
    return report


# ----------------------------------------------------------------------------------------------------------
# Specificity: empty images, amorphous blobs, colours between two palette colours


def empty_image(rng: np.random.Generator, condition: str = "clean") -> Image.Image:
    """Background only, with the renderer's noise, then the condition's perturbation."""
    lo, hi = BACKGROUND_RANGE
    background = rng.integers(lo, hi + 1, size=3)
    noise = rng.normal(0.0, rng.uniform(0.0, 3.0), size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.rint(background + noise), 0, 255).astype(np.uint8)
    return CONDITIONS[condition](Image.fromarray(pixels, mode="RGB"), rng)


def blob_image(rng: np.random.Generator) -> Image.Image:
    """One amorphous blob in a palette colour: a closed curve r(theta) = R (1 + sum_k a_k cos(k theta + p_k))
    with k = 1..4 all present at similar amplitudes (no harmonic dominates, so it is no n-gon), drawn like the
    renderer draws shapes (4x supersampled, box filter), with a 12..22 px box."""
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    amplitudes = rng.uniform(0.12, 0.22, size=4)
    phases = rng.uniform(0, 2 * np.pi, size=4)
    radius = 1 + sum(
        a * np.cos((k + 1) * angles + p) for k, (a, p) in enumerate(zip(amplitudes, phases, strict=True))
    )
    xs, ys = radius * np.cos(angles), radius * np.sin(angles)
    extent = max(np.ptp(xs), np.ptp(ys))
    scale = rng.uniform(12, 22) / extent
    cx, cy = rng.uniform(16, IMAGE_SIZE - 16, size=2)
    ss = SUPERSAMPLE
    polygon = [((cx + scale * x) * ss, (cy + scale * y) * ss) for x, y in zip(xs, ys, strict=True)]
    canvas = Image.new("L", (IMAGE_SIZE * ss, IMAGE_SIZE * ss), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=255)
    coverage = (
        np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), np.float32)[..., None] / 255
    )
    lo, hi = BACKGROUND_RANGE
    background = rng.integers(lo, hi + 1, size=3).astype(np.float32)
    colour = np.asarray(COLORS[COLOR_NAMES[rng.integers(len(COLOR_NAMES))]], dtype=np.float32)
    pixels = (
        background * (1 - coverage) + colour * coverage + rng.normal(0, 2.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    )
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def halfway_color_image(rng: np.random.Generator, color_a: str, color_b: str) -> tuple[Scene, Image.Image]:
    """A one-object scene whose object is drawn in the RGB midpoint of two palette colours."""
    scene = sample_scene(rng, specs=[ObjectSpec(color=color_a)])
    middle = tuple(round((a + b) / 2) for a, b in zip(COLORS[color_a], COLORS[color_b], strict=True))
    obj = dataclasses.replace(scene.objects[0], rgb=middle)
    scene = dataclasses.replace(scene, objects=(obj,))
    return scene, render(scene)


def _between_pairs() -> list[tuple[str, str]]:
    """Colour pairs whose RGB midpoint is nearer to them than to any third palette colour. (The midpoint of
    red and yellow, say, is orange: naming it orange is right, so such pairs test nothing.)"""
    pairs = []
    for i, a in enumerate(COLOR_NAMES):
        for b in COLOR_NAMES[i + 1 :]:
            middle = (np.asarray(COLORS[a]) + np.asarray(COLORS[b])) / 2
            nearest = min(COLOR_NAMES, key=lambda c: float(np.linalg.norm(np.asarray(COLORS[c]) - middle)))
            if nearest in (a, b):
                pairs.append((a, b))
    return pairs


BETWEEN_COLOR_PAIRS: tuple[tuple[str, str], ...] = tuple(_between_pairs())


def specificity(n: int, seed: int, min_confidence: float = judge.DEFAULT_MIN_CONFIDENCE) -> dict[str, float]:
    """False-positive rates: any detection on background-only images; a confident detection of an amorphous
    blob; a colour name (not None) for an object drawn halfway between two palette colours (pairs in
    BETWEEN_COLOR_PAIRS); each clean and after `degrade`."""
    rng = np.random.default_rng(seed)
    model = judge.load_shape_model()
    rates: dict[str, float] = {}
    for condition in ("clean", "degraded"):
        perturbation = CONDITIONS[condition]
        empty = sum(bool(judge.detect(empty_image(rng, condition), min_confidence)) for _ in range(n))
        rates[f"empty_{condition}_any_detection"] = empty / n
        blob_confidences = np.asarray(
            [
                max(
                    (c.confidence for c in judge.find_candidates(perturbation(blob_image(rng), rng), model)),
                    default=0,
                )
                for _ in range(n)
            ]
        )
        rates[f"blob_{condition}_accepted"] = float((blob_confidences >= min_confidence).mean())
        rates[f"blob_{condition}_p99_confidence"] = float(np.quantile(blob_confidences, 0.99))
        named = 0
        for k in range(n):
            a, b = BETWEEN_COLOR_PAIRS[k % len(BETWEEN_COLOR_PAIRS)]
            _, image = halfway_color_image(rng, a, b)
            detections = judge.detect(perturbation(image, rng), min_confidence=0.0)
            named += any(d.color is not None for d in detections)
        rates[f"halfway_color_{condition}_named"] = named / n
    return rates


def close_pair_scene(rng: np.random.Generator, max_gap: float = 3.0) -> Scene:
    """Two random objects whose boxes are at most `max_gap` px apart (the world's minimum is 2): after a blur
    such neighbours nearly touch, which is where objects could merge."""
    return sample_scene(
        rng,
        specs=[ObjectSpec(), ObjectSpec()],
        constraint=lambda objects: box_gap(objects[0].box, objects[1].box) <= max_gap,
    )


def close_pairs(n: int, seed: int, condition: str = "degraded") -> JudgeReport:
    """Object-level accuracy on `close_pair_scene`s."""
    rng = np.random.default_rng(seed)
    report = JudgeReport(f"close pairs, {condition}")
    for _ in range(n):
        scene = close_pair_scene(rng)
        score_image(report, scene, CONDITIONS[condition](render(scene), rng), judge.DEFAULT_MIN_CONFIDENCE)
    return report


def rough_merge_rate(n: int, seed: int, condition: str = "degraded") -> float:
    """Fraction of `close_pair_scene`s whose two objects share a component of the rough coverage (the first
    segmentation pass), which the second pass then has to split."""
    rng = np.random.default_rng(seed)
    merged = 0
    for _ in range(n):
        scene = close_pair_scene(rng)
        pixels = judge.as_pixels(CONDITIONS[condition](render(scene), rng))
        rough = judge.rough_coverage(pixels, judge.estimate_background(pixels))
        labels, _ = ndimage.label(rough >= judge.COVERAGE_THRESHOLD)
        last = IMAGE_SIZE - 1
        owners = {labels[min(int(y), last), min(int(x), last)] for x, y in (o.center for o in scene.objects)}
        merged += len(owners) == 1 and 0 not in owners
    return merged / n


# ----------------------------------------------------------------------------------------------------------
# Fitting the shape model

FIT_CONDITIONS: tuple[str, ...] = ("clean", "degraded", "blur1.5", "elastic0.5+blur1")
FIT_RIDGE = 1e-2  # added to each covariance's diagonal, in standardised units: keeps tails from collapsing


def fitting_features(n_scenes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shape features and true shape indices of the objects in `n_scenes` random scenes per FIT_CONDITIONS."""
    features, shapes = [], []
    for offset, condition in enumerate(FIT_CONDITIONS):
        rng = np.random.default_rng([seed, offset])
        for _ in range(n_scenes):
            scene = sample_scene(rng)
            candidates = judge.find_candidates(CONDITIONS[condition](render(scene), rng))
            matches = match_boxes([o.box for o in scene.objects], [c.box for c in candidates], min_iou=0.5)
            for t, f, _ in matches:
                features.append(candidates[f].features)
                shapes.append(SHAPES.index(scene.objects[t].shape))
    return np.asarray(features), np.asarray(shapes)


def fit_shape_model(n_scenes: int = 1500, seed: int = 20240611) -> judge.ShapeModel:
    """Fit the judge's Gaussian-per-shape model on renders, deterministically for a given (n_scenes, seed)."""
    features, shapes = fitting_features(n_scenes, seed)
    offset, scale = features.mean(axis=0), features.std(axis=0)
    standard = (features - offset) / scale
    means, precisions, log_dets, typical = [], [], [], []
    for s in range(len(SHAPES)):
        own = standard[shapes == s]
        covariance = np.cov(own.T) + FIT_RIDGE * np.eye(own.shape[1])
        precision = np.linalg.inv(covariance)
        centred = own - own.mean(axis=0)
        distances = np.einsum("ni,ij,nj->n", centred, precision, centred)
        means.append(own.mean(axis=0))
        precisions.append(precision)
        log_dets.append(np.linalg.slogdet(covariance)[1])
        typical.append(np.quantile(distances, 0.995))
    return judge.ShapeModel(
        feature_names=judge.FEATURE_NAMES,
        shapes=SHAPES,
        offset=offset,
        scale=scale,
        means=np.asarray(means),
        precisions=np.asarray(precisions),
        log_dets=np.asarray(log_dets),
        typical_distance=np.asarray(typical),
        meta={
            "n_scenes_per_condition": n_scenes,
            "seed": seed,
            "conditions": list(FIT_CONDITIONS),
            "ridge": FIT_RIDGE,
            "objects": len(shapes),
            "refit": "python -m blip3o.world.judge_eval --refit",
        },
    )


def save_shape_model(model: judge.ShapeModel, path=judge.SHAPE_MODEL_PATH) -> None:
    path.write_text(json.dumps(model.to_json(), indent=1) + "\n")
    judge.load_shape_model.cache_clear()


# ----------------------------------------------------------------------------------------------------------


def speed(n: int = 200, seed: int = 0) -> float:
    """Images per second of `judge.detect` on clean renders (rendering excluded), in this process."""
    rng = np.random.default_rng(seed)
    images = [render(sample_scene(rng)) for _ in range(n)]
    judge.detect(images[0])  # load the model outside the timing
    start = time.perf_counter()
    for image in images:
        judge.detect(image)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--refit", action="store_true", help="refit and save the shape model first")
    parser.add_argument("--n", type=int, default=2000, help="scenes per condition")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.refit:
        start = time.perf_counter()
        save_shape_model(fit_shape_model())
        print(f"refitted {judge.SHAPE_MODEL_PATH} in {time.perf_counter() - start:.0f}s")
    for index, condition in enumerate(EVAL_CONDITIONS):
        report = judge_accuracy(args.n, args.seed + index, condition=condition)
        print(report.summary())
        print("  confusion (rows: true; columns: " + ", ".join(SHAPES) + ", missed)")
        for shape, row in zip(SHAPES, report.confusion, strict=True):
            print(f"    {shape:>8s} " + " ".join(f"{v:6d}" for v in row))
    for condition in ("clean", "degraded", "blur2"):
        print(close_pairs(max(args.n // 4, 50), args.seed + 50, condition).summary())
        rate = rough_merge_rate(max(args.n // 4, 50), args.seed + 60, condition)
        print(f"  close pairs merged by the rough pass (then split), {condition}: {rate:.4f}")
    for key, value in specificity(max(args.n // 4, 50), args.seed + 100).items():
        print(f"{key}: {value:.4f}")
    print(f"speed: {speed():.0f} images/s (one process)")
    print(f"confidence threshold: {judge.DEFAULT_MIN_CONFIDENCE}; edge error: mean |box edge - true edge|")


if __name__ == "__main__":
    main()
