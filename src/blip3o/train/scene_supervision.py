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


class SceneCellHead(nn.Module):
    """Linear shape and colour classifiers over each merged vision token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.shape = nn.Linear(hidden_size, NO_OBJECT_SHAPE + 1)
        self.colour = nn.Linear(hidden_size, NO_OBJECT_COLOR + 1)

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
        return loss, metrics
