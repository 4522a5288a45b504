"""ShapesGenEval scoring: GenEval's rules applied to detections, over GenEval's sample-folder layout.

Rules (per image, given the prompt record; see blip3o.world.prompts for the schema):
- each include, in order: take the `count` most confident detections of its class; fewer than `count` ->
  wrong. With a `color`, at least `count` of those must have that colour. With a `position`
  [relation, j], every one of them must stand in `relation` to every object matched by include j (by
  `relations_between`, GenEval's centre-offset rule); if include j failed, there is no target -> wrong.
  An include that fails matches nothing (later includes cannot refer to it).
- each exclude: wrong if the image holds `count` or more detections of its class.
Scores: per-category accuracy over images; overall = the mean of the category accuracies.

Thresholding is the detector's business: every detection passed in counts.

Sample layout (identical to GenEval's):
    <samples>/<index:05d>/metadata.jsonl    the prompt's JSON record, one line
    <samples>/<index:05d>/samples/<k:04d>.png
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from blip3o.world.prompts import CATEGORIES
from blip3o.world.scene import Box, Scene, relations_between

RESULTS_FILE = "geneval_results.jsonl"  # one line per image
SCORES_FILE = "geneval_scores.json"  # the summary
TABLE_FILE = "geneval_table.txt"
METADATA_FILE = "metadata.jsonl"
SAMPLES_SUBDIR = "samples"


class DetectionLike(Protocol):
    """What the scorer reads from a detection (blip3o.world.judge.Detection has these fields)."""

    shape: str
    color: str | None
    box: Box
    confidence: float


@dataclass(frozen=True)
class OracleDetection:
    """A perfect detection read off the scene graph."""

    shape: str
    color: str | None
    box: Box
    confidence: float = 1.0


def scene_detections(scene: Scene) -> list[OracleDetection]:
    """The oracle: what a perfect detector would report. Scoring these gives the ground truth."""
    return [OracleDetection(o.shape, o.color, tuple(o.box)) for o in scene.objects]


def score_detections(meta: dict, detections: Iterable[DetectionLike]) -> tuple[bool, str]:
    """Score one image's detections against a prompt record. Returns (correct, reason); reason is '' when
    correct, otherwise every failed check, joined by '; '."""
    by_class: dict[str, list[DetectionLike]] = {}
    for det in sorted(detections, key=lambda d: -d.confidence):  # stable: ties keep the detector's order
        by_class.setdefault(det.shape, []).append(det)

    failures: list[str] = []
    matched: list[list[DetectionLike] | None] = []  # per include: the objects it matched, None if it failed
    for index, req in enumerate(meta.get("include", [])):
        shape, count = req["class"], int(req["count"])
        found = by_class.get(shape, [])[:count]
        failure = _check_include(req, found, matched, index)
        if failure:
            failures.append(failure)
        matched.append(None if failure else found)

    for req in meta.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= int(req["count"]):
            failures.append(f"expected fewer than {req['count']} {req['class']}, found {n}")
    return not failures, "; ".join(failures)


def _check_include(
    req: dict, found: list[DetectionLike], matched: list[list[DetectionLike] | None], index: int
) -> str:
    """'' if the include is met by `found`, else why not."""
    shape, count = req["class"], int(req["count"])
    if len(found) < count:
        return f"expected {count} {shape}, found {len(found)}"
    color = req.get("color")
    if color is not None:
        n_color = sum(d.color == color for d in found)
        if n_color < count:
            seen = ", ".join(str(d.color) for d in found)
            return f"expected {count} {color} {shape}, found {n_color} (colours: {seen})"
    if "position" in req:
        relation, target = req["position"][0], int(req["position"][1])
        if not 0 <= target < index:
            raise ValueError(f"include {index} ({shape}) refers to include {target}, which is not before it")
        targets = matched[target]
        if targets is None:
            return f"no target for {shape} to be {relation}"
        for obj in found:
            for tgt in targets:
                actual = relations_between(obj.box, tgt.box)
                if relation not in actual:
                    got = " and ".join(sorted(actual)) or "no relation"
                    return f"expected {shape} {relation} {tgt.shape}, found {got}"
    return ""


# ---------------------------------------------------------------------------------------------- aggregation


def summarize(image_results: Iterable[dict]) -> dict:
    """Per-category accuracy over images (each result needs 'tag' and 'correct'), overall = their mean.

    Categories come in GenEval's order; tags outside the six follow and count toward the mean too.
    """
    totals: dict[str, list[int]] = {}
    n_prompts: set[int] = set()
    for r in image_results:
        correct_total = totals.setdefault(r["tag"], [0, 0])
        correct_total[0] += bool(r["correct"])
        correct_total[1] += 1
        if "folder" in r:
            n_prompts.add(r["folder"])
    tags = [t for t in CATEGORIES if t in totals] + sorted(t for t in totals if t not in CATEGORIES)
    categories = {
        t: {"correct": totals[t][0], "images": totals[t][1], "accuracy": totals[t][0] / totals[t][1]}
        for t in tags
    }
    overall = float(np.mean([c["accuracy"] for c in categories.values()])) if categories else 0.0
    return {
        "overall": overall,
        "categories": categories,
        "missing_categories": [t for t in CATEGORIES if t not in totals],
        "images": sum(c["images"] for c in categories.values()),
        "prompts": len(n_prompts),
    }


def detection_verdicts(records: Sequence[dict], detections: Sequence[Iterable[DetectionLike]]) -> list[bool]:
    """Each prompt record's verdict (GenEval's rules) on its own detection list."""
    if len(detections) != len(records):
        raise ValueError(f"got {len(detections)} detection lists for {len(records)} prompt records")
    return [score_detections(r, d)[0] for r, d in zip(records, detections, strict=True)]


def score_detection_lists(
    records: Sequence[dict],
    detections: Sequence[Iterable[DetectionLike]],
    verdicts: Sequence[bool] | None = None,
) -> dict:
    """A compact score of one detection list per prompt record (e.g. read from generated tokens instead of
    images): the share of lists with any detection ("found"), the overall score and each category's, rounded to
    3 places. `verdicts` (from `detection_verdicts`) saves scoring the lists again when the caller has them."""
    detections = [list(d) for d in detections]
    if verdicts is None:
        verdicts = detection_verdicts(records, detections)  # checks the lengths itself
    elif not len(verdicts) == len(detections) == len(records):
        raise ValueError(
            f"got {len(verdicts)} verdicts and {len(detections)} detection lists for {len(records)} prompt records"
        )
    summary = summarize({"tag": r["tag"], "correct": v} for r, v in zip(records, verdicts, strict=True))
    per_category = {tag: round(c["accuracy"], 3) for tag, c in summary["categories"].items()}
    found = float(np.mean([len(d) > 0 for d in detections])) if detections else 0.0
    return {"found": round(found, 3), "overall": round(summary["overall"], 3), **per_category}


def format_table(summary: dict) -> str:
    """A plain-text table of a summary, one line per category and the overall score."""
    header = f"{'category':<14}{'correct':>9}{'images':>9}{'accuracy':>10}"
    lines = [header, "-" * len(header)]
    for tag, c in summary["categories"].items():
        lines.append(f"{tag:<14}{c['correct']:>9}{c['images']:>9}{c['accuracy']:>10.4f}")
    lines.append("-" * len(header))
    lines.append(f"{'overall':<14}{'':>9}{summary['images']:>9}{summary['overall']:>10.4f}")
    if summary["missing_categories"]:
        lines.append(f"missing categories (not in the mean): {', '.join(summary['missing_categories'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the sample folder


class SampleFolderError(ValueError):
    """The sample folder does not follow GenEval's layout."""


@dataclass(frozen=True)
class PromptSamples:
    """One prompt's folder: its index, record and image paths."""

    folder: int
    path: Path
    meta: dict
    images: tuple[Path, ...]


def _prompt_dir(outdir: Path, index: int) -> Path:
    return outdir / f"{index:05d}"


def write_prompt_samples(
    outdir: str | Path, index: int, record: dict, images: Sequence[Image.Image | np.ndarray]
) -> Path:
    """Write one prompt's folder: metadata.jsonl and samples/0000.png, ... Refuses to add to existing
    samples (a mix of two runs would be scored as one)."""
    prompt_dir = _prompt_dir(Path(outdir), index)
    samples_dir = prompt_dir / SAMPLES_SUBDIR
    if samples_dir.is_dir() and any(samples_dir.glob("*.png")):
        raise FileExistsError(f"{samples_dir} already holds samples; write into an empty folder")
    samples_dir.mkdir(parents=True, exist_ok=True)
    (prompt_dir / METADATA_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
    for k, image in enumerate(images):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        pil.save(samples_dir / f"{k:04d}.png")
    return prompt_dir


def write_sample_folder(
    outdir: str | Path,
    records: Sequence[dict],
    images_per_record: Iterable[Sequence[Image.Image | np.ndarray]],
) -> list[Path]:
    """Write a GenEval-layout folder: record i's images go to <outdir>/<i:05d>/samples/.

    images_per_record yields one sequence of images per record, in order (a generator keeps memory flat).
    """
    remaining = iter(images_per_record)
    paths = []
    for index, record in enumerate(records):
        images = next(remaining, None)
        if images is None:
            raise ValueError(f"images_per_record ran out after {index} of {len(records)} records")
        paths.append(write_prompt_samples(outdir, index, record, images))
    if next(remaining, None) is not None:
        raise ValueError(f"images_per_record yields more image sets than the {len(records)} records")
    return paths


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise SampleFolderError(f"{path} is missing")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != 1:
        raise SampleFolderError(f"{path} must hold exactly one JSON line, found {len(lines)}")
    try:
        meta = json.loads(lines[0])
    except json.JSONDecodeError as err:
        raise SampleFolderError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in ("tag", "include", "prompt") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise SampleFolderError(f"{path} lacks the key(s) {missing} of a GenEval prompt record")
    return meta


def read_sample_folder(samples_dir: str | Path) -> list[PromptSamples]:
    """Index a GenEval-layout folder (numbered subfolders; other entries are ignored) without loading images."""
    root = Path(samples_dir)
    if not root.is_dir():
        raise SampleFolderError(f"samples folder {root} does not exist or is not a folder")
    prompt_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not prompt_dirs:
        raise SampleFolderError(f"{root} holds no numbered prompt folders (expected {root}/00000/ ...)")
    prompts = []
    for path in prompt_dirs:
        images = tuple(sorted((path / SAMPLES_SUBDIR).glob("*.png")))
        if not images:
            raise SampleFolderError(f"{path / SAMPLES_SUBDIR} holds no .png images")
        prompts.append(PromptSamples(int(path.name), path, _read_metadata(path / METADATA_FILE), images))
    return prompts


@dataclass
class GenEvalResults:
    images: list[dict]  # one per image: folder, image, tag, prompt, correct, reason, detections
    summary: dict
    table: str


def _detection_to_json(det: DetectionLike) -> dict:
    return {
        "shape": det.shape,
        "color": det.color,
        "box": [round(float(v), 2) for v in det.box],
        "confidence": round(float(det.confidence), 4),
    }


def score_sample_folder(
    samples_dir: str | Path,
    detect_fn: Callable[[Image.Image], Sequence[DetectionLike]],
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> GenEvalResults:
    """Detect and score every image of a GenEval-layout folder.

    detect_fn: image (RGB PIL) -> detections (e.g. blip3o.world.judge.detect).
    out_dir: if given, write RESULTS_FILE (per image), SCORES_FILE (summary) and TABLE_FILE there.
    """
    prompts = read_sample_folder(samples_dir)
    n_images = sum(len(p.images) for p in prompts)
    results = []
    with tqdm(total=n_images, desc="geneval", unit="img", disable=not progress) as bar:
        for p in prompts:
            for image_path in p.images:
                with Image.open(image_path) as img:
                    detections = list(detect_fn(img.convert("RGB")))
                correct, reason = score_detections(p.meta, detections)
                results.append(
                    {
                        "folder": p.folder,
                        "image": str(image_path.relative_to(p.path.parent)),
                        "tag": p.meta["tag"],
                        "prompt": p.meta["prompt"],
                        "correct": correct,
                        "reason": reason,
                        "detections": [_detection_to_json(d) for d in detections],
                    }
                )
                bar.update(1)
    summary = summarize(results)
    out = GenEvalResults(results, summary, format_table(summary))
    if out_dir is not None:
        write_results(out, out_dir)
    return out


def write_results(results: GenEvalResults, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / RESULTS_FILE, "scores": out / SCORES_FILE, "table": out / TABLE_FILE}
    paths["results"].write_text("".join(json.dumps(r) + "\n" for r in results.images), encoding="utf-8")
    paths["scores"].write_text(json.dumps(results.summary, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(results.table + "\n", encoding="utf-8")
    return paths
