"""How much of ShapesVQA's relation kind coarse positions decide: the ceiling of any answer read off a grid.

    .venv/bin/python bench/relation_ceiling.py runs/x/data [--grids 3 4 8 16]

For each grid size g, a table from (cell of A, cell of B, asked relation) to the majority answer is filled from
the training shards' relation questions (cells: g x g of the canvas, by box centre, as `object_location` uses
for thirds), then ShapesVQA's relation questions are answered from it ("no" for unseen keys). Thirds (g = 3) are
what the captions and where-answers name, so they bound relation answers spelled out through where each object
is (bench/oracle_tokens.py --relation-steps); 4 is the merged vision grid of the miniature (64 px, 16 px
tokens). At 16 most keys are unseen in training, so the table, not the grid, is what runs short there.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from blip3o.eval.vqa import vqa_scene, vqa_set
from blip3o.train.data import load_shards
from blip3o.world.language import named_object, relation_question_parts
from blip3o.world.scene import Scene


def relation_key(scene: Scene, question: str, grid: int) -> tuple | None:
    """((column, row) of A, (column, row) of B, relation) on a grid x grid split, or None if not a relation."""
    parts = relation_question_parts(question)
    if parts is None:
        return None
    colour_a, shape_a, relation, colour_b, shape_b = parts

    def cell(colour: str, shape: str) -> tuple[int, int]:
        obj = named_object(scene, colour, shape)
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        return min(int(cx * grid / scene.size), grid - 1), min(int(cy * grid / scene.size), grid - 1)

    return cell(colour_a, shape_a), cell(colour_b, shape_b), relation


def ceiling(examples, items, grid: int) -> tuple[float, int, int]:
    """(accuracy on the relation items, training questions, distinct keys seen in training)."""
    table: dict[tuple, Counter] = defaultdict(Counter)
    seen = 0
    for ex in examples:
        for question, answer in ex.qa:
            key = relation_key(ex.scene, question, grid)
            if key is not None:
                table[key][answer] += 1
                seen += 1
    right = 0
    for it in items:
        key = relation_key(vqa_scene(it.image_index, it.seed), it.question, grid)
        guess = table[key].most_common(1)[0][0] if table[key] else "no"
        right += guess == it.answer
    return right / len(items), seen, len(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a run's shard folder")
    parser.add_argument("--grids", type=int, nargs="+", default=[3, 4, 8, 16])
    args = parser.parse_args(argv)
    examples, _ = load_shards(args.data)
    items = [it for it in vqa_set() if it.kind == "relation"]
    print(f"{len(items)} ShapesVQA relation questions; table from {len(examples)} training images")
    for grid in args.grids:
        accuracy, seen, keys = ceiling(examples, items, grid)
        print(f"grid {grid:2d}x{grid:<2d}: accuracy {accuracy:.3f}  ({seen} training questions, {keys} keys)")


if __name__ == "__main__":
    main()
