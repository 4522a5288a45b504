"""Stage kind "vision": pretrain the backbone's vision tower on ShapesWorld scene labels before stage 1.

Why: the released backbone starts from a pretrained Qwen2.5-VL whose vision tower already sees shapes. Ours
starts from scratch, and trained only through the language-model loss its tower barely encodes shape
(bench/vision_probe.py: a linear shape probe at 0.35, chance 0.20, after the whole stage 1), so ShapesVQA's
shape, existence and "colour of the star" questions sat at chance. This stage stands in for that pretraining.

Each merged vision token covers one cell of a G x G grid (ShapesWorld: 4 x 4 cells of 16 px). A linear head
reads every token and predicts the shape and the colour of the object whose centre lies in its cell, or
"none". Linear, so the tower has to make shape and colour linearly readable, which is what the language
model's first layer can use. The head is training scaffolding: it lives in the stage, not in the model, and
is not exported.

Optionally (`StageConfig.cell_position_weight`), every token also regresses the centre of its own cell, as
(x, y) in [-1, 1]. Why: the Qwen2.5-VL tower knows positions only through rotary attention, so a token's
content hardly says where it is (bench/vision_probe.py, each token's row / column: 0.30 / 0.32, chance 0.25),
and the language model can then find "the red circle" but not read off where it is; ShapesVQA's relation
questions sit at chance. With the loss (weight 1, 3000 steps) the probe reads 0.93 / 0.94, but relation
questions stayed at chance after an 8,000-step stage 1 (0.487 against 0.507, full set), so the recipe leaves
it off: the language model is what fails to compare positions at this size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.world.scene import COLOR_NAMES, SHAPES, Scene

NO_OBJECT_SHAPE = len(SHAPES)  # the "none" class of the shape head
NO_OBJECT_COLOR = len(COLOR_NAMES)  # the "none" class of the colour head


def scene_cell_labels(scene: Scene, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape, colour) class per cell of a grid x grid raster, each (grid * grid,) int64.

    A cell is labelled with the object whose centre lies in it (the larger box if several do), else with the
    "none" classes."""
    cell = scene.size / grid
    shape = torch.full((grid * grid,), NO_OBJECT_SHAPE)
    colour = torch.full((grid * grid,), NO_OBJECT_COLOR)
    area = [0.0] * (grid * grid)
    for obj in scene.objects:
        cx, cy = obj.center
        col = min(max(int(cx // cell), 0), grid - 1)
        row = min(max(int(cy // cell), 0), grid - 1)
        index = row * grid + col
        if obj.width * obj.height > area[index]:
            area[index] = obj.width * obj.height
            shape[index] = SHAPES.index(obj.shape)
            colour[index] = COLOR_NAMES.index(obj.color)
    return shape, colour


def cell_centres(grid: int) -> torch.Tensor:
    """(grid * grid, 2) centre of each cell in raster order, as (x, y) in [-1, 1] (y grows downward)."""
    index = torch.arange(grid * grid)
    col, row = index % grid, index // grid
    return torch.stack([(col + 0.5) / grid * 2 - 1, (row + 0.5) / grid * 2 - 1], dim=1)  # (N, 2)


class SceneCellHead(nn.Module):
    """Linear shape and colour classifiers over each merged vision token, and optionally a linear regressor
    of the token's own cell centre (only built when `position_weight` > 0, so older checkpoints still load)."""

    def __init__(self, hidden_size: int, position_weight: float = 0.0):
        super().__init__()
        if position_weight < 0:
            raise ValueError(f"position_weight must be >= 0, got {position_weight}")
        self.shape = nn.Linear(hidden_size, NO_OBJECT_SHAPE + 1)
        self.colour = nn.Linear(hidden_size, NO_OBJECT_COLOR + 1)
        self.position_weight = position_weight
        self.position = nn.Linear(hidden_size, 2) if position_weight > 0 else None

    def loss(self, tokens: torch.Tensor, scenes: list[Scene]) -> tuple[torch.Tensor, dict]:
        """tokens (B, N, H) with N = grid * grid; the summed cross-entropies, and the object-cell accuracies."""
        grid = math.isqrt(tokens.shape[1])
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"expected a square grid of vision tokens, got {tokens.shape[1]}")
        if len(scenes) != tokens.shape[0] or any(s is None for s in scenes):
            raise ValueError("the vision stage needs one scene per image (shards written with their scenes)")
        labels = [scene_cell_labels(s, grid) for s in scenes]
        shape_y = torch.cat([y for y, _ in labels]).to(tokens.device)  # (B * N,)
        colour_y = torch.cat([y for _, y in labels]).to(tokens.device)  # (B * N,)
        flat = tokens.reshape(-1, tokens.shape[-1]).float()  # (B * N, H)
        shape_logits, colour_logits = self.shape(flat), self.colour(flat)  # (B * N, classes)
        loss = F.cross_entropy(shape_logits, shape_y) + F.cross_entropy(colour_logits, colour_y)
        with torch.no_grad():
            has_object = shape_y != NO_OBJECT_SHAPE
            n = has_object.sum().clamp(min=1)
            metrics = {
                "shape_acc": (shape_logits.argmax(1) == shape_y)[has_object].sum() / n,
                "colour_acc": (colour_logits.argmax(1) == colour_y)[has_object].sum() / n,
            }
        if self.position is not None:
            centres = cell_centres(grid).to(flat.device).repeat(len(scenes), 1)  # (B * N, 2)
            predicted = self.position(flat)  # (B * N, 2)
            loss = loss + self.position_weight * F.mse_loss(predicted, centres)
            with torch.no_grad():
                # The cell a prediction falls in, per axis; right when both axes are.
                cell = ((predicted + 1) / 2 * grid).floor().clamp(0, grid - 1)  # (B * N, 2)
                true_cell = ((centres + 1) / 2 * grid).floor()  # (B * N, 2)
                metrics["position_acc"] = (cell == true_cell).all(dim=1).float().mean()
        return loss, metrics
