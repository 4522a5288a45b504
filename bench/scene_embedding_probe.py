"""How close are a vision stage's merged tokens to the scene-embedding target? Decode them back, cell by cell.

    .venv/bin/python bench/scene_embedding_probe.py runs/x/vision/model [--scenes 400]

For a vision stage trained with `StageConfig.scene_embedding_weight` (train/scene_supervision.py): on fresh
ShapesWorld scenes, each merged token minus its cell's row and column vectors is fitted by least squares with the
table's shape, colour, third-row, third-column and "empty" vectors, and read back: the likeliest of each group,
"object" where the empty coefficient is below 0.5. Printed: the relative error of the tokens against the target,
and over the cells that hold exactly one object's box centre, how often its shape, colour, third row, third
column, place (both thirds) and everything at once are read right; and how many empty cells read empty. These are
what the language model would have to read (bench/oracle_tokens.py --tower trains it on them).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.train.scene_supervision import SceneEmbeddingTable, box_centre_cell
from blip3o.world.language import COLUMNS, ROWS, object_location
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES, Scene

GRID = 4


def decode_cells(tokens: torch.Tensor, table: SceneEmbeddingTable, scenes: list[Scene]) -> Counter:
    """Counts of right reads for tokens (B, 16, H) of `scenes` (see the module docstring)."""
    cell_row, cell_col, shape, colour, third_row, third_col, empty = table.parts()
    basis = torch.cat([shape, colour, third_row, third_col, empty]).T  # (H, 20)
    groups = [len(SHAPES), len(COLOR_NAMES), len(ROWS), len(COLUMNS), 1]
    index = torch.arange(GRID * GRID)
    residual = tokens.float() - (cell_row[index // GRID] + cell_col[index % GRID])  # (B, 16, H)
    flat = residual.reshape(-1, residual.shape[-1]).T  # (H, B * 16)
    coef = torch.linalg.lstsq(basis, flat).solution.T.reshape(len(scenes), GRID * GRID, -1)  # (B, 16, 20)
    counts: Counter = Counter()
    for b, scene in enumerate(scenes):
        centred: dict[int, list] = {}
        for obj in scene.objects:
            row, col = box_centre_cell(obj, scene.size, GRID)
            centred.setdefault(row * GRID + col, []).append(obj)
        for cell in range(GRID * GRID):
            read = torch.split(coef[b, cell], groups)
            says_object = read[4].item() < 0.5
            if cell not in centred:
                counts["empty cells"] += 1
                counts["read empty"] += not says_object
                continue
            if len(centred[cell]) > 1:  # two centres in one cell: the target is their sum, not one object
                continue
            obj = centred[cell][0]
            where_row, where_col = object_location(obj, scene.size)
            right = {
                "shape": read[0].argmax().item() == SHAPES.index(obj.shape),
                "colour": read[1].argmax().item() == COLOR_NAMES.index(obj.color),
                "row": read[2].argmax().item() == ROWS.index(where_row),
                "column": read[3].argmax().item() == COLUMNS.index(where_col),
            }
            right["place"] = right["row"] and right["column"]
            right["all"] = all(right.values()) and says_object
            counts["object cells"] += 1
            counts.update(key for key, ok in right.items() if ok)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", type=Path, help="a model folder whose vision tower had the scene-embedding loss"
    )
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = Blip3o.from_pretrained(args.model).backbone.eval()
    table = SceneEmbeddingTable(backbone.config.hidden_size, GRID)
    scenes = [sample_scene(np.random.default_rng([args.seed, i])) for i in range(args.scenes)]
    counts: Counter = Counter()
    errors = []
    with torch.no_grad():
        for start in range(0, len(scenes), 50):
            chunk = scenes[start : start + 50]
            tokens = backbone.vision_tokens([render(s) for s in chunk])  # (B, 16, H)
            target = table.targets(chunk, GRID)
            errors.append(((tokens - target).pow(2).mean() / target.pow(2).mean()).item())
            counts += decode_cells(tokens, table, chunk)
    n = counts["object cells"]
    reads = ", ".join(
        f"{k} {counts[k] / n:.3f}" for k in ("shape", "colour", "row", "column", "place", "all")
    )
    print(f"relative error {np.mean(errors):.3f}; {n} object cells: {reads}; "
          f"empty cells read empty {counts['read empty']}/{counts['empty cells']}")  # fmt: skip


if __name__ == "__main__":
    main()
