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

Optionally (`StageConfig.scene_embedding_weight`), every token also regresses, directly (no head in between), a
fixed object-centric embedding of its cell (`SceneEmbeddingTable`): the sum of fixed random vectors for its row
and column and, for each object whose box centre lies in it, its shape, its colour and the third of the canvas
(row, column) that centre lies in, or an "empty" vector (box centres, as the thirds and the judge use; the
classifiers above label cells by the shape's own centre, which differs in a few cells). Those are the perfect tokens
of bench/oracle_tokens.py, except that the oracle's embeddings learn with the language model. Why a regression of
the tokens themselves: a linear head only needs the information to be there, however small; the language model
needs it as plain as in the oracle (shape explains 16% of a linearly supervised token's variance). Why thirds: the
captions and where-answers name thirds, which the 4 x 4 cells do not resolve (16 px against 21.3 px).
Measured (session 47, docs/bench/understanding_position_trials.txt): after 9,000 steps at weight 1 the tokens read
back shape 0.986, colour 0.998, place in thirds 0.956 (bench/scene_embedding_probe.py), and a 4,000-step stage 1 on
them (bench/oracle_tokens.py --tower) reaches ShapesVQA 0.811, the colour of a named shape 0.940 and the count of a
shape 0.847 (the recipe's tower: 0.740 / 0.607 / 0.473). Places are still not read (where-questions 0.394).
Session 48: on the fixed target itself, with relation answers spelled out (world/reasoning.py) and relation
questions trained first, places are read (where-questions 1.000) and ShapesVQA reaches 0.980; on a 5,000-step
tower's tokens the same short curriculum gave 0.611 (where 0.397): the language model reads the target, not yet
the tower's approximation of it. Session 49: it does once it learns on the target: understanding stages that read
the target for half their images (StageConfig.target_tokens) reach ShapesVQA 0.948 through a 9,000-step tower's own
tokens (where 0.967; shapes-object-v2, docs/bench/understanding_position_trials.txt).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from blip3o.models.clip import ClipConfig
from blip3o.world.judge import Detection
from blip3o.world.language import COLUMNS, ROWS, object_location
from blip3o.world.render import make_object, render_object_mask, unit_extent
from blip3o.world.sampler import jitter_color, keep_inside, sample_background
from blip3o.world.scene import (
    COLOR_NAMES,
    IMAGE_SIZE,
    MAX_BOX,
    MAX_NOISE_STD,
    MAX_ROTATION,
    MIN_BOX,
    SHAPES,
    Scene,
    SceneObject,
)

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


# The patch-label layout of `scene_patch_labels` (ClipConfig.patch_label_groups / patch_label_values).
PATCH_LABEL_GROUPS = (len(SHAPES) + 1, len(COLOR_NAMES) + 1)
PATCH_LABEL_VALUES = 4


def scene_patch_labels(scene: Scene, grid: int) -> torch.Tensor:
    """(grid * grid, 19) label vector per patch of a grid x grid raster, raster order, float32.

    - 6 values: the share of the patch covered by each shape, then the uncovered share ("none"); sums to 1.
    - 9 values: the same by colour.
    - 4 values: the covered share (any object) of each quadrant of the patch: top-left, top-right,
      bottom-left, bottom-right. Finer than the patch, so a token can say where in it the object lies.
    Coverage is the renderer's anti-aliased mask (objects never overlap: their boxes keep a gap).
    """
    size = scene.size
    if size % (2 * grid):
        raise ValueError(f"image size {size} is not a multiple of 2 x grid {grid}")
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    shape_share = np.zeros((n_shapes, size, size), np.float32)
    colour_share = np.zeros((n_colours, size, size), np.float32)
    for obj in scene.objects:
        cov = render_object_mask(obj, size)  # (S, S)
        shape_share[SHAPES.index(obj.shape)] += cov
        colour_share[COLOR_NAMES.index(obj.color)] += cov
    covered = np.clip(shape_share[:-1].sum(0), 0.0, 1.0)  # (S, S)
    shape_share[-1] = 1.0 - covered
    colour_share[-1] = 1.0 - covered

    def per_cell(maps: np.ndarray, cells: int) -> np.ndarray:  # (C, S, S) -> (cells * cells, C) means
        c, p = maps.shape[0], size // cells
        return maps.reshape(c, cells, p, cells, p).mean(axis=(2, 4)).reshape(c, -1).T

    quadrants = per_cell(covered[None], 2 * grid).reshape(grid, 2, grid, 2)  # (row, dy, col, dx)
    quadrants = quadrants.transpose(0, 2, 1, 3).reshape(grid * grid, 4)  # (N, 4): TL, TR, BL, BR
    labels = np.concatenate([per_cell(shape_share, grid), per_cell(colour_share, grid), quadrants], axis=1)
    return torch.from_numpy(labels.astype(np.float32))  # (N, 19)


def box_centre_cell(obj: SceneObject, size: int, grid: int) -> tuple[int, int]:
    """(row, col) of the grid x grid patch holding the object's box centre: the one token the object-centric
    target (`scene_object_labels`) writes the object to."""
    x0, y0, x1, y1 = obj.box
    cell = size / grid
    return min(int((y0 + y1) / 2 // cell), grid - 1), min(int((x0 + x1) / 2 // cell), grid - 1)


def scene_object_labels(scene: Scene, grid: int) -> torch.Tensor:
    """(grid * grid, 19) object-centric label vector per patch of a grid x grid raster, raster order, float32.

    The patch holding an object's box centre names that object; every other patch says "none":
    - 6 values: one-hot shape, or "none" (last);
    - 9 values: one-hot colour, or "none";
    - 4 values: the box centre's offset from the patch centre (x, y, in half patches: [-1, 1]), the box's mean
      side ([-1, 1] over MIN_BOX..MAX_BOX) and the rotation ([-1, 1] over +-MAX_ROTATION); zeros for "none".
    Same layout as `scene_patch_labels`. ShapesWorld boxes are >= 12 px wide and >= 2 px apart, so with patches
    of 8 px no two centres share a patch (checked: ValueError otherwise).
    """
    cell = scene.size / grid
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    labels = torch.zeros(grid * grid, n_shapes + n_colours + PATCH_LABEL_VALUES)
    labels[:, n_shapes - 1] = 1.0  # "none" shape
    labels[:, n_shapes + n_colours - 1] = 1.0  # "none" colour
    mid, half_range = (MIN_BOX + MAX_BOX) / 2, (MAX_BOX - MIN_BOX) / 2
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        row, col = box_centre_cell(obj, scene.size, grid)
        label = labels[row * grid + col]
        if label[n_shapes - 1] == 0:
            raise ValueError(f"two object centres in patch ({row}, {col}) of a {grid}x{grid} grid")
        label[: n_shapes + n_colours] = 0.0
        label[SHAPES.index(obj.shape)] = 1.0
        label[n_shapes + COLOR_NAMES.index(obj.color)] = 1.0
        offset = n_shapes + n_colours
        label[offset] = (cx - (col + 0.5) * cell) / (cell / 2)
        label[offset + 1] = (cy - (row + 0.5) * cell) / (cell / 2)
        label[offset + 2] = ((x1 - x0 + y1 - y0) / 2 - mid) / half_range
        label[offset + 3] = obj.rotation / MAX_ROTATION
    return labels  # (N, 19)


def object_label_detections(labels: torch.Tensor, size: int = IMAGE_SIZE) -> list[Detection]:
    """The inverse of `scene_object_labels` for one image, as judge detections: (grid * grid, 19) labels (or a
    label head's reading of them) -> one detection per patch whose likeliest shape is not "none", with the
    likeliest real colour, a square box of the read mean side around the read centre, and confidence
    1 - p(none), kept only where that confidence peaks in its 3 x 3 patch neighbourhood (CenterNet's peak
    rule: a label head trained with `ClipConfig.patch_label_balanced` also reads "object" in the patches next to
    a centre; measured, all of its extra reads on real renders were such neighbours). Exact labels lose nothing:
    two true centres tie at 1. Reads generated targets too, so a model's samples can be judged without a pixel
    decoder."""
    found = []
    for read in _read_objects(labels, size):
        (cx, cy), half = read.center, read.side / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        found.append(Detection(read.shape, read.color, box, read.confidence))
    return found


class _ReadObject(NamedTuple):
    shape: str
    color: str
    center: tuple[float, float]  # the box centre, pixels
    side: float  # the box's mean side, pixels
    rotation: float  # degrees
    confidence: float  # 1 - p(none)


def object_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B, N, 19) labels (or a label head's readings) -> (B, N) bool: the tokens `object_label_detections` reads
    as objects: the likeliest shape is not "none" and the object probability 1 - p(none) peaks in its 3 x 3
    patches (ties kept)."""
    n_shapes = PATCH_LABEL_GROUPS[0]
    batch, tokens, _ = labels.shape
    grid = math.isqrt(tokens)
    present = (1 - labels[..., n_shapes - 1]).reshape(batch, 1, grid, grid)
    peaks = (present >= F.max_pool2d(present, 3, stride=1, padding=1)).reshape(batch, tokens)  # (B, N)
    return peaks & (labels[..., :n_shapes].argmax(-1) != n_shapes - 1)


def read_centre(col, row, dx, dy, cell: float):
    """The box centre (x, y) in pixels a token of patch (row, col) names with its offsets dx, dy (half patches);
    floats or tensors alike (the inverse of `scene_object_labels`' offsets)."""
    return (col + 0.5 + dx / 2) * cell, (row + 0.5 + dy / 2) * cell


def read_side(value):
    """The box's mean side in pixels a token names with its side value ([-1, 1] over MIN_BOX..MAX_BOX)."""
    return (MIN_BOX + MAX_BOX) / 2 + value * ((MAX_BOX - MIN_BOX) / 2)


def _read_objects(labels: torch.Tensor, size: int) -> list[_ReadObject]:
    """The objects (grid * grid, 19) labels name, by `object_label_detections`' peak rule, in raster order."""
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    grid = math.isqrt(labels.shape[0])
    if grid * grid != labels.shape[0] or labels.shape[1] != n_shapes + n_colours + PATCH_LABEL_VALUES:
        raise ValueError(
            f"expected (grid * grid, {n_shapes + n_colours + PATCH_LABEL_VALUES}) labels, got {tuple(labels.shape)}"
        )
    cell = size / grid
    found = []
    for index in object_tokens(labels.float()[None])[0].nonzero().flatten().tolist():
        label = labels[index].float()
        row, col = divmod(index, grid)
        dx, dy, side, rotation = label[n_shapes + n_colours :].tolist()
        found.append(
            _ReadObject(
                shape=SHAPES[int(label[: n_shapes - 1].argmax())],
                color=COLOR_NAMES[int(label[n_shapes : n_shapes + n_colours - 1].argmax())],
                center=read_centre(col, row, dx, dy, cell),
                side=read_side(side),
                rotation=rotation * MAX_ROTATION,
                confidence=float(1 - label[n_shapes - 1]),
            )
        )
    return found


def object_label_scene(labels: torch.Tensor, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """A scene of what (grid * grid, 19) labels (or a label head's reading) say, rendered as ShapesWorld draws:
    one object per `object_label_detections` detection, of its shape and colour (jittered like the sampler's),
    box centre, mean side (clamped to MIN_BOX..MAX_BOX) and rotation (clamped to +-MAX_ROTATION; 0 for circles),
    kept inside the canvas; background, noise and colour jitter drawn from `rng` as `sample_scene` draws them.
    Objects are not kept apart: two reads that overlap are drawn overlapping, in raster order.

    What for: the image a generated condition describes, so a pixel decoder can learn to draw the DiT's own
    tokens as clean ShapesWorld objects (StageConfig.generated_pairs = "reading")."""
    objects = []
    for read in _read_objects(labels, size):
        rotation = 0.0 if read.shape == "circle" else min(max(read.rotation, -MAX_ROTATION), MAX_ROTATION)
        side = min(max(read.side, MIN_BOX), MAX_BOX)
        width, height = unit_extent(read.shape, rotation)
        scale = side / ((width + height) / 2)
        obj = make_object(read.shape, read.color, jitter_color(rng, read.color), read.center, scale, rotation)
        # The polygon's box is not centred on its anchor (a triangle's is not): move the box onto the read centre.
        x0, y0, x1, y1 = obj.box
        center = (2 * read.center[0] - (x0 + x1) / 2, 2 * read.center[1] - (y0 + y1) / 2)
        objects.append(
            keep_inside(make_object(read.shape, read.color, obj.rgb, center, scale, rotation), size)
        )
    background = sample_background(rng)
    noise_std = float(rng.uniform(0.0, MAX_NOISE_STD))
    return Scene(background, tuple(objects), noise_std, int(rng.integers(2**31 - 1)), size)


PATCH_LABELS = {"coverage": scene_patch_labels, "object": scene_object_labels}


def clip_patch_labels(config: ClipConfig, scenes: list[Scene] | None) -> torch.Tensor:
    """(B, N, 19) patch labels of a batch's scenes (of `config.patch_label_kind`) for a CLIP whose label head has
    this module's layout."""
    if (config.patch_label_groups, config.patch_label_values) != (PATCH_LABEL_GROUPS, PATCH_LABEL_VALUES):
        raise ValueError(
            f"ClipConfig patch labels {config.patch_label_groups} + {config.patch_label_values} values do not "
            f"match ShapesWorld's {PATCH_LABEL_GROUPS} + {PATCH_LABEL_VALUES}"
        )
    if not scenes or any(s is None for s in scenes):
        raise ValueError(
            "a CLIP with a patch-label head needs one scene per image (shards written with scenes)"
        )
    labels = PATCH_LABELS[config.patch_label_kind]
    return torch.stack([labels(s, config.patch_grid) for s in scenes])  # (B, N, 19)


class SceneEmbeddingTable(nn.Module):
    """Fixed random vectors (RMS 1 each, from a fixed seed) whose sums are the object-centric target of each cell:
    `targets(scenes, grid)` -> (B, grid * grid, H). A buffer, not a parameter: the target must not move towards the
    tokens; saved with the stage's head, so a resumed stage regresses the same target."""

    def __init__(self, hidden_size: int, grid: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.grid = grid
        # Rows of the table, in order: grid cell rows, grid cell columns, shapes, colours, 3 thirds of rows,
        # 3 thirds of columns, empty.
        self.sizes = (grid, grid, len(SHAPES), len(COLOR_NAMES), len(ROWS), len(COLUMNS), 1)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(sum(self.sizes), hidden_size, generator=generator))

    def parts(self) -> tuple[torch.Tensor, ...]:
        return torch.split(self.table, self.sizes)

    def targets(self, scenes: list[Scene], grid: int) -> torch.Tensor:
        """(B, grid * grid, H) target tokens of `scenes`, raster order."""
        if grid != self.grid:
            raise ValueError(
                f"this table was built for a {self.grid}x{self.grid} grid, the tokens form {grid}x{grid}"
            )
        cell_row, cell_col, shape, colour, third_row, third_col, empty = self.parts()
        index = torch.arange(grid * grid, device=self.table.device)
        cells = cell_row[index // grid] + cell_col[index % grid]  # (N, H)
        out = []
        for scene in scenes:
            objects = torch.zeros_like(cells)  # (N, H)
            filled = torch.zeros(grid * grid, dtype=torch.bool)
            for obj in scene.objects:
                row, col = box_centre_cell(obj, scene.size, grid)
                where_row, where_col = object_location(obj, scene.size)
                objects[row * grid + col] += (
                    shape[SHAPES.index(obj.shape)]
                    + colour[COLOR_NAMES.index(obj.color)]
                    + third_row[ROWS.index(where_row)]
                    + third_col[COLUMNS.index(where_col)]
                )
                filled[row * grid + col] = True
            objects[~filled.to(objects.device)] = empty[0]
            out.append(cells + objects)
        return torch.stack(out)  # (B, N, H)


def replace_merged_tokens(merged: torch.Tensor, tokens: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """The tower's merged tokens `merged` (B * N, H), images in batch order, with those of the images where `use`
    (B,) is true taken from `tokens` (B, N, H)."""
    if merged.shape != tokens.flatten(0, 1).shape:
        raise ValueError(
            f"replacement tokens {tuple(tokens.shape)} do not match the tower's {tuple(merged.shape)} "
            f"(B * N, H) merged tokens"
        )
    keep = use.to(merged.device).repeat_interleave(tokens.shape[1])  # (B * N,)
    return torch.where(keep[:, None], tokens.flatten(0, 1).to(merged), merged)  # (B * N, H)


@contextmanager
def vision_tokens_replaced(tower: nn.Module, tokens: torch.Tensor, use: torch.Tensor) -> Iterator[None]:
    """Within this block, the tower's merged tokens of the images where `use` (B,) is true are `tokens` (B, N, H)
    instead (StageConfig.target_tokens: the scene-embedding target for a frozen tower trained towards it). A
    forward hook, so the model code stays as it is; removed on leaving, also on an error."""

    def replace(module, args, kwargs, output):
        output.pooler_output = replace_merged_tokens(output.pooler_output, tokens, use)
        return output

    handle = tower.register_forward_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def cell_centres(grid: int) -> torch.Tensor:
    """(grid * grid, 2) centre of each cell in raster order, as (x, y) in [-1, 1] (y grows downward)."""
    index = torch.arange(grid * grid)
    col, row = index % grid, index // grid
    return torch.stack([(col + 0.5) / grid * 2 - 1, (row + 0.5) / grid * 2 - 1], dim=1)  # (N, 2)


class SceneCellHead(nn.Module):
    """Linear shape and colour classifiers over each merged vision token, and optionally a linear regressor
    of the token's own cell centre (only built when `position_weight` > 0, so older checkpoints still load), and
    optionally the fixed scene-embedding target the tokens regress directly (only when `embedding_weight` > 0)."""

    def __init__(
        self,
        hidden_size: int,
        position_weight: float = 0.0,
        cosine_scale: float = 0.0,
        embedding_weight: float = 0.0,
    ):
        super().__init__()
        if position_weight < 0 or cosine_scale < 0 or embedding_weight < 0:
            raise ValueError(
                "position_weight, cosine_scale and embedding_weight must be >= 0, got "
                f"{position_weight}, {cosine_scale}, {embedding_weight}"
            )
        # 0: linear classifiers; > 0: cosine ones (StageConfig.scene_cosine_scale), built without a bias so that
        # no parameter goes unused (DDP would refuse one).
        self.cosine_scale = cosine_scale
        self.shape = nn.Linear(hidden_size, NO_OBJECT_SHAPE + 1, bias=not cosine_scale)
        self.colour = nn.Linear(hidden_size, NO_OBJECT_COLOR + 1, bias=not cosine_scale)
        self.position_weight = position_weight
        self.position = nn.Linear(hidden_size, 2) if position_weight > 0 else None
        self.embedding_weight = embedding_weight
        self.embeddings = SceneEmbeddingTable(hidden_size) if embedding_weight > 0 else None

    def logits(self, head: nn.Linear, flat: torch.Tensor) -> torch.Tensor:
        """(B * N, classes) logits of one classifier for tokens `flat` (B * N, H)."""
        if not self.cosine_scale:
            return head(flat)
        unit_tokens, unit_classes = F.normalize(flat, dim=-1), F.normalize(head.weight, dim=-1)
        return self.cosine_scale * unit_tokens @ unit_classes.T

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
        shape_logits, colour_logits = self.logits(self.shape, flat), self.logits(self.colour, flat)
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
        if self.embeddings is not None:
            target = self.embeddings.targets(scenes, grid).to(flat.device)  # (B, N, H)
            error = F.mse_loss(tokens.float(), target)
            loss = loss + self.embedding_weight * error
            # Relative error: 0 when the tokens are the target, 1 for tokens of zeros.
            metrics["embedding_error"] = error.detach() / target.pow(2).mean()
        return loss, metrics
