"""Does the language model know where things are? The places and relations in its own long captions, scored.

    .venv/bin/python bench/caption_locations.py MODEL [--images 200] [--threads 2]

Why: ShapesVQA's relation questions sit at chance (0.49) on the bundled model, and training focused on them
did not move them (bench/focused_finetune.py). This asks the model for "Describe the image in detail." on fresh
renders and checks the statements the recipe's long captions are made of against the scene:
- each "<colour> <shape> ... in the <row> <column>" sentence about an object that is the only one of its colour
  and shape: is the row right, is the column right (thirds of the canvas, `object_location`)? The baseline is
  always naming the most common row / column of those objects;
- each relation sentence between two such objects ("the red circle is left of the blue star"): does every
  relation it names hold (`relations_between`)?
A model whose captions place objects at chance cannot read positions, whatever its question answering does.

Figures: README, "Where it fails" (understanding).
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import numpy as np
import torch

from blip3o.world.language import object_location
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, RELATIONS, SHAPES, Scene, relations_between

DETAIL_PROMPT = "Describe the image in detail."
_NAME = r"(?:the |a |an |another )?(" + "|".join(COLOR_NAMES) + r") (" + "|".join(SHAPES) + r")"
_OBJECT = re.compile(_NAME)
_PLACE = re.compile(r"in the centre|in the (top|middle|bottom) (left|centre|right)")
_RELATION = re.compile(r"\b(" + "|".join(RELATIONS) + r")\b")


def _unique_objects(scene: Scene) -> dict:
    combos = collections.Counter((o.color, o.shape) for o in scene.objects)
    return {(o.color, o.shape): o for o in scene.objects if combos[(o.color, o.shape)] == 1}


def caption_statements(scene: Scene, caption: str) -> tuple[list[tuple[bool, bool]], list[bool]]:
    """(row right, column right) per placed object and (all named relations hold) per relation sentence, for
    the sentences of `caption` about objects that are unique in `scene` by colour and shape."""
    unique = _unique_objects(scene)
    places, relations = [], []
    for sentence in caption.lower().split("."):
        names = [(m.group(1), m.group(2)) for m in _OBJECT.finditer(sentence)]
        named_relations = set(_RELATION.findall(sentence))
        if len(names) == 2 and named_relations and all(n in unique for n in names):
            # "<x> is <rel> and <rel> <y>": the first name is the subject.
            holds = relations_between(unique[names[0]].box, unique[names[1]].box)
            relations.append(named_relations <= holds)
        elif len(names) == 1 and not named_relations and names[0] in unique:
            place = _PLACE.search(sentence)
            if place is None:
                continue
            said = ("middle", "centre") if place.group(1) is None else (place.group(1), place.group(2))
            row, col = object_location(unique[names[0]], scene.size)
            places.append((said[0] == row, said[1] == col))
    return places, relations


def score_captions(scenes: list[Scene], captions: list[str]) -> dict:
    """Row / column accuracy of placed objects, relation accuracy, and the most-common-place baselines."""
    places, relations, rows, cols = [], [], collections.Counter(), collections.Counter()
    for scene, caption in zip(scenes, captions, strict=True):
        p, r = caption_statements(scene, caption)
        places += p
        relations += r
        for obj in _unique_objects(scene).values():
            row, col = object_location(obj, scene.size)
            rows[row] += 1
            cols[col] += 1
    n = max(len(places), 1)
    return {
        "placed_objects": len(places),
        "row_accuracy": round(sum(r for r, _ in places) / n, 3),
        "column_accuracy": round(sum(c for _, c in places) / n, 3),
        "row_baseline": round(max(rows.values()) / max(sum(rows.values()), 1), 3),
        "column_baseline": round(max(cols.values()) / max(sum(cols.values()), 1), 3),
        "relation_sentences": len(relations),
        "relation_accuracy": round(sum(relations) / max(len(relations), 1), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123, help="world seed of the fresh renders")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from blip3o.models.blip3o import Blip3o

    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.images)]
    captions = []
    for i in range(0, len(scenes), args.batch):
        images = [render(s) for s in scenes[i : i + args.batch]]
        captions += model.backbone.understand(images, [DETAIL_PROMPT] * len(images), args.max_new_tokens)
    result = {"model": args.model, "images": args.images, **score_captions(scenes, captions)}
    print(json.dumps(result))
    print("example:", captions[0])
    return result


if __name__ == "__main__":
    main()
