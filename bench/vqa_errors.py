"""Where a model's ShapesVQA answers go wrong, and how much of its vision tokens shape and colour explain.

    .venv/bin/python bench/vqa_errors.py src/blip3o/bundled/model [--answers-out answers.json]
    .venv/bin/python bench/vqa_errors.py runs/x/vision/model --tokens [--images 400]

Answers: the full ShapesVQA set (2,100 questions, greedy), then for the kinds that need an object found by its
shape or a comparison (colour of a named shape, count of a shape, existence, relation): accuracy by the
scene's object count, and what the wrong answers were: another object's colour or an absent one; which count for
which; "yes" for "no" and the reverse; relations by axis (left/right against above/below) and truth.

--tokens: the share of the merged vision tokens' variance (cells holding an object's centre) that the object's
shape class and its colour class explain (between-class over total sum of squares), on fresh renders. The language
model finds objects by what dominates a token; docs/bench/understanding_position_trials.txt (session 43).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import numpy as np
import torch

LOOKUP_KINDS = ("color", "count_shape", "exist", "relation")


def wrong_answer_kind(kind: str, answer: str, expected: str, scene_colours: set[str]) -> str:
    """What a wrong answer was, in words a table can count."""
    if kind == "color":
        return "another object's colour" if answer in scene_colours else "absent colour"
    if kind in ("count_shape", "count_color", "count_total", "exist", "relation"):
        return f"said {answer} for {expected}"
    return answer


def error_breakdown(items: list, answers: dict[str, str], scenes: dict[int, object]) -> dict:
    """{"by_objects": {kind: {n_objects: [right, asked]}}, "wrong": {kind: Counter}, "relation_axis":
    {(axis, truth): [right, asked]}} for ShapesVQA items, their answers by id and scenes by image index."""
    by_objects: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    wrong: dict = collections.defaultdict(collections.Counter)
    axis: dict = collections.defaultdict(lambda: [0, 0])
    for it in items:
        scene = scenes[it.image_index]
        answer = answers.get(it.id, "").strip().lower()
        right = answer == it.answer.lower()
        cell = by_objects[it.kind][len(scene.objects)]
        cell[0], cell[1] = cell[0] + right, cell[1] + 1
        if it.kind == "relation":
            horizontal = "left of" in it.question or "right of" in it.question
            tally = axis[("horizontal" if horizontal else "vertical", it.answer)]
            tally[0], tally[1] = tally[0] + right, tally[1] + 1
        if not right:
            colours = {o.color for o in scene.objects}
            wrong[it.kind][wrong_answer_kind(it.kind, answer, it.answer, colours)] += 1
    return {"by_objects": by_objects, "wrong": wrong, "relation_axis": axis}


def class_variance_share(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class sum of squares over the total, for features (N, D) and integer labels (N,)."""
    x = features.double()
    centred = x - x.mean(0)
    between = sum(
        (labels == k).sum().item() * (x[labels == k].mean(0) - x.mean(0)).pow(2).sum()
        for k in labels.unique()
    )
    return float(between / centred.pow(2).sum())


def token_shares(model, n_images: int, seed: int) -> dict:
    """Shape and colour variance shares of the object cells' merged vision tokens over fresh renders."""
    from blip3o.train.scene_supervision import NO_OBJECT_SHAPE, scene_cell_labels
    from blip3o.world.render import render
    from blip3o.world.sampler import sample_scene

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n_images)]
    tokens, shapes, colours = [], [], []
    with torch.no_grad():
        for i in range(0, n_images, 50):
            batch = scenes[i : i + 50]
            merged = model.backbone.vision_tokens([render(s) for s in batch])  # (B, N, H)
            grid = math.isqrt(merged.shape[1])
            tokens.append(merged.reshape(-1, merged.shape[-1]))  # (B * N, H)
            for scene in batch:
                shape, colour = scene_cell_labels(scene, grid)  # (N,) each
                shapes.append(shape)
                colours.append(colour)
    x, s, c = torch.cat(tokens), torch.cat(shapes), torch.cat(colours)
    held = s != NO_OBJECT_SHAPE  # cells holding an object's centre
    return {
        "object_cells": int(held.sum()),
        "shape_share": class_variance_share(x[held], s[held]),
        "colour_share": class_variance_share(x[held], c[held]),
        "token_rms": float(x[held].double().pow(2).mean().sqrt()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model folder")
    parser.add_argument(
        "--tokens", action="store_true", help="measure the vision tokens instead of answering"
    )
    parser.add_argument("--images", type=int, default=400, help="with --tokens: renders (default 400)")
    parser.add_argument("--seed", type=int, default=5, help="with --tokens: world seed of the renders")
    parser.add_argument("--answers-out", type=Path, help="write the answers by question id as JSON")
    args = parser.parse_args(argv)

    from blip3o.models.blip3o import Blip3o

    model = Blip3o.from_pretrained(args.model).float().eval()
    if args.tokens:
        shares = token_shares(model, args.images, args.seed)
        print(
            f"{args.model}: {shares['object_cells']} object cells; variance share shape "
            f"{shares['shape_share']:.3f}, colour {shares['colour_share']:.3f}; token RMS {shares['token_rms']:.2f}"
        )
        return 0

    from blip3o.eval.model_eval import vqa_with_model
    from blip3o.eval.vqa import VQA_QUESTIONS, vqa_scene, vqa_set

    result = vqa_with_model(model, progress=True)
    items = vqa_set(VQA_QUESTIONS)
    scenes = {it.image_index: vqa_scene(it.image_index, it.seed) for it in items}
    breakdown = error_breakdown(items, result["answers"], scenes)
    per_kind = {k: round(v["mean"], 3) for k, v in result["per_kind"].items()}
    print(f"{args.model}: overall {result['overall']['mean']:.4f} {per_kind}")
    tallies = breakdown["relation_axis"].items()
    print("relation by axis / truth:", {f"{a}/{t}": f"{r}/{n}" for (a, t), (r, n) in sorted(tallies)})
    for kind in LOOKUP_KINDS:
        counts = {n: f"{r}/{t}" for n, (r, t) in sorted(breakdown["by_objects"][kind].items())}
        print(f"{kind} by object count: {counts}")
        print(f"   wrong: {breakdown['wrong'][kind].most_common(8)}")
    if args.answers_out:
        args.answers_out.write_text(json.dumps(result["answers"], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
