"""Generation stages' scaffolding loss: slot k of the DiT's condition resampler names the k-th object the
caption names.

Why: trained by the flow loss alone, the resampler (models/condition_resampler.py) does not separate the
objects and the DiT does worse than without it (bench/label_judge.py after stage 2 of the shapes-object recipe:
0.021, against 0.113 without a resampler and 0.280 with this loss; docs/bench/object_target.txt, session 22).
With this loss its slots become one token per object, the form the DiT binds colour to shape from. It stands
in for what a large pretrained language model's states already offer and ours, 128 wide and trained on
ShapesWorld only, do not: objects kept apart.

A shared linear head reads every slot: slot k classifies the shape and the colour of the k-th object
(`world.language.caption_objects`; the first len(scene.objects) of them when the scene is known, since long
captions name objects again in their relation sentences), slots past the last object the "none" classes. A
prompt that names no colour ("a photo of two circles") trains the shape only. The head is training scaffolding:
it lives in the stage, not in the model, and is not exported.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.train.scene_supervision import NO_OBJECT_COLOR, NO_OBJECT_SHAPE, box_centre_cell
from blip3o.world.language import caption_objects, caption_words
from blip3o.world.scene import COLOR_NAMES, OPPOSITE_RELATION, RELATIONS, SHAPES, Scene

UNNAMED = -100  # cross_entropy's ignore_index: the caption names no colour for this object
NO_RELATION = len(RELATIONS)  # the relation class of an object in a caption that states no relation
_RELATION_PATTERN = re.compile(r"\b(" + "|".join(RELATIONS) + r")\b")
# How the binding loss orders a scene's objects when matching them to the caption's (see _slot_objects).
SLOT_ORDERS = ("scene", "left_to_right")


def caption_slot_labels(
    caption: str, slots: int, scene: Scene | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape, colour) class per slot, each (slots,) int64: the caption's objects in order, then "none"."""
    objects = caption_objects(caption)
    if scene is not None:
        objects = objects[: len(scene.objects)]
    shape = torch.full((slots,), NO_OBJECT_SHAPE)
    colour = torch.full((slots,), NO_OBJECT_COLOR)
    for k, (name, color) in enumerate(objects[:slots]):
        shape[k] = SHAPES.index(name)
        colour[k] = UNNAMED if color is None else COLOR_NAMES.index(color)
    return shape, colour


def caption_slot_positions(caption: str, slots: int, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Where slot k's object sits: centres (slots, 2) as (x, y) / scene size, and which slots have one (slots,).

    The caption's k-th object is matched to the first scene object not yet taken with its shape and, when the
    caption names it, its colour (scenes list their objects in their own order, not the caption's). Slots past
    the caption's objects, and objects the scene does not hold, have no position."""
    centres = torch.zeros(slots, 2)
    known = torch.zeros(slots, dtype=torch.bool)
    for k, match in _slot_objects(caption, slots, scene).items():
        centres[k] = torch.tensor(match.center) / scene.size
        known[k] = True
    return centres, known


def caption_slot_cells(
    caption: str, slots: int, scene: Scene, grid: int, order: str = "scene"
) -> torch.Tensor:
    """Which token of a grid x grid target holds slot k's object, (slots,) int64, or UNNAMED.

    The token is the patch holding the object's box centre: where `scene_object_labels` writes the object (the
    shapes-object target names each object in that one token). Matched as `caption_slot_positions` does, the
    scene's objects taken in `order` (SLOT_ORDERS)."""
    cells = torch.full((slots,), UNNAMED)
    for k, match in _slot_objects(caption, slots, scene, order).items():
        row, col = box_centre_cell(match, scene.size, grid)
        cells[k] = row * grid + col
    return cells


def _slot_objects(caption: str, slots: int, scene: Scene, order: str = "scene") -> dict:
    """{slot k: the scene object the caption's k-th object is}, by first free match of shape and colour, the
    scene's objects taken in `order` (SLOT_ORDERS): it decides which of several objects the caption names alike
    each one is."""
    if order not in SLOT_ORDERS:
        raise ValueError(f"order must be one of {', '.join(SLOT_ORDERS)}, got {order!r}")
    matched = {}
    free = list(scene.objects)
    if order == "left_to_right":
        free.sort(key=lambda o: o.center)  # (x, y): leftmost first, ties broken top to bottom
    for k, (name, color) in enumerate(caption_objects(caption)[: min(slots, len(scene.objects))]):
        match = next((o for o in free if o.shape == name and color in (None, o.color)), None)
        if match is not None:
            free.remove(match)
            matched[k] = match
    return matched


def caption_slot_relations(caption: str, slots: int) -> torch.Tensor:
    """Where each slot's object stands relative to the other one, (slots,) int64 indices into RELATIONS.

    A two-object position phrase, "a red circle left of a blue star": slot 1 "left of", slot 2 "right of"
    (each object's own side, so both tokens carry the relation). A caption that states no relation: its
    objects' slots NO_RELATION. Everything else is UNNAMED (ignored): slots past the objects, and captions with
    more objects or relations than that (long captions' relation sentences, whose subjects are not slot 1)."""
    labels = torch.full((slots,), UNNAMED)
    objects = caption_objects(caption)
    stated = _RELATION_PATTERN.findall(" ".join(caption_words(caption)))
    if not stated:
        labels[: min(len(objects), slots)] = NO_RELATION
    elif len(stated) == 1 and len(objects) == 2 and slots >= 2:
        labels[0] = RELATIONS.index(stated[0])
        labels[1] = RELATIONS.index(OPPOSITE_RELATION[stated[0]])
    return labels


def _check_captions(captions: list[str], batch: int) -> None:
    if len(captions) != batch:
        raise ValueError(f"{len(captions)} captions for {batch} rows of slot tokens")


class SlotLabelHead(nn.Module):
    """Shared linear shape and colour classifiers over every resampler slot (and, with `position`, a shared
    linear regressor of the slot's object centre; with `relation`, a shared classifier of its relation)."""

    def __init__(self, width: int, position: bool = False, relation: bool = False):
        super().__init__()
        self.shape = nn.Linear(width, NO_OBJECT_SHAPE + 1)
        self.colour = nn.Linear(width, NO_OBJECT_COLOR + 1)
        self.position = nn.Linear(width, 2) if position else None
        self.relation = nn.Linear(width, NO_RELATION + 1) if relation else None

    def relation_loss(self, slot_tokens: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict]:
        """slot_tokens (B, S, W); the cross-entropy over the labelled slots (`caption_slot_relations`) and their
        accuracy (the same keys in every batch, as distributed logging reduces them key by key)."""
        if self.relation is None:
            raise ValueError("this head has no relation classifier (SlotLabelHead(relation=True))")
        batch, slots, width = slot_tokens.shape
        _check_captions(captions, batch)
        labels = torch.cat([caption_slot_relations(c, slots) for c in captions])  # (B * S,)
        labels = labels.to(slot_tokens.device)
        logits = self.relation(slot_tokens.reshape(-1, width).float())  # (B * S, relations + 1)
        labelled = labels != UNNAMED  # (B * S,)
        # No labelled slot: a zero that still reaches the head's parameters (DDP expects their gradients).
        if not labelled.any():
            return logits.sum() * 0.0, {"slot_relation_acc": logits.new_zeros(())}
        loss = F.cross_entropy(logits, labels, ignore_index=UNNAMED)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == labels)[labelled].float().mean()
        return loss, {"slot_relation_acc": accuracy}

    def position_loss(
        self, slot_tokens: torch.Tensor, captions: list[str], scenes: list[Scene | None]
    ) -> tuple[torch.Tensor, dict]:
        """slot_tokens (B, S, W); the mean squared error of the predicted centres over slots with an object.

        A caption rarely fixes where an object is, so the best prediction is the centre's expectation given the
        caption: "a circle left of a square" puts the circle's left of the square's. Training towards it makes
        the slots carry the relation the DiT has to draw."""
        if self.position is None:
            raise ValueError("this head has no position regressor (SlotLabelHead(position=True))")
        if any(scene is None for scene in scenes):
            raise ValueError(
                "the slot position loss needs every sample's scene (shards and stage 3 hold them)"
            )
        batch, slots, _ = slot_tokens.shape
        _check_captions(captions, batch)
        labels = [caption_slot_positions(c, slots, s) for c, s in zip(captions, scenes, strict=True)]
        centres = torch.stack([c for c, _ in labels]).to(slot_tokens.device)  # (B, S, 2)
        known = torch.stack([k for _, k in labels]).to(slot_tokens.device)  # (B, S)
        predicted = self.position(slot_tokens.float())  # (B, S, 2)
        error = (predicted - centres).pow(2).sum(-1)  # (B, S)
        loss = (error * known).sum() / known.sum().clamp(min=1)
        with torch.no_grad():
            mae = ((predicted - centres).abs().mean(-1) * known).sum() / known.sum().clamp(min=1)
        return loss, {"slot_position_mae": mae}

    def loss(
        self, slot_tokens: torch.Tensor, captions: list[str], scenes: list[Scene | None] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """slot_tokens (B, S, W); the summed cross-entropies and the named objects' accuracies."""
        batch, slots, width = slot_tokens.shape
        _check_captions(captions, batch)
        scenes = scenes if scenes is not None else [None] * batch
        labels = [caption_slot_labels(c, slots, s) for c, s in zip(captions, scenes, strict=True)]
        shape_y = torch.cat([y for y, _ in labels]).to(slot_tokens.device)  # (B * S,)
        colour_y = torch.cat([y for _, y in labels]).to(slot_tokens.device)  # (B * S,)
        flat = slot_tokens.reshape(-1, width).float()  # (B * S, W)
        shape_logits, colour_logits = self.shape(flat), self.colour(flat)  # (B * S, classes)
        loss = F.cross_entropy(shape_logits, shape_y) + F.cross_entropy(
            colour_logits, colour_y, ignore_index=UNNAMED
        )
        with torch.no_grad():
            named = shape_y != NO_OBJECT_SHAPE  # (B * S,) slots holding an object
            coloured = named & (colour_y != UNNAMED)  # and the caption names its colour
            metrics = {
                "slot_shape_acc": (shape_logits.argmax(1) == shape_y)[named].sum() / named.sum().clamp(min=1),
                "slot_colour_acc": (colour_logits.argmax(1) == colour_y)[coloured].sum()
                / coloured.sum().clamp(min=1),
            }
        return loss, metrics


def slot_binding_loss(
    cross_attention: list[torch.Tensor],
    captions: list[str],
    scenes: list[Scene | None],
    keep: torch.Tensor,
    order: str = "scene",
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy that the DiT's token holding the caption's k-th object reads slot k among the objects' slots.

    cross_attention: each layer's (B, H, N, S) weights over the resampler's slots (`DiT(..., cross_attention=[])`);
    keep (B,) bool: the rows whose condition was not dropped for guidance. Scored, per layer, on the head-mean
    weights of every object token in scenes where two or more of the caption's objects are matched
    (`caption_slot_cells`), the weights renormalised over those objects' slots only: the loss asks which object
    a token reads, not how much it reads the condition at all. `order` (SLOT_ORDERS) says which of several
    objects named alike is slot k's. Returns the loss and the share of such tokens
    whose largest weight is their own slot, in every layer (`slot_binding_acc`)."""
    if not cross_attention:
        raise ValueError("no cross-attention weights were recorded")
    batch, _, tokens, slots = cross_attention[0].shape
    _check_captions(captions, batch)
    if any(scene is None for scene in scenes):
        raise ValueError("the slot binding loss needs every sample's scene (shards and stage 3 hold them)")
    grid = math.isqrt(tokens)
    attention = torch.stack(cross_attention, dim=1).mean(dim=2)  # (B, layers, N, S)
    cells = torch.stack(
        [caption_slot_cells(c, slots, s, grid, order) for c, s in zip(captions, scenes, strict=True)]
    )
    cells = cells.to(attention.device)  # (B, S)
    objects = cells != UNNAMED  # (B, S)
    objects &= (keep.to(attention.device) & (objects.sum(dim=1) >= 2))[:, None]
    rows, slot = objects.nonzero(as_tuple=True)  # (P,) each: one scored token per matched object
    if rows.numel() == 0:  # a zero that still reaches the DiT's parameters (DDP expects their gradients)
        return attention.sum() * 0.0, {"slot_binding_acc": attention.new_zeros(())}
    read = attention[rows, :, cells[rows, slot], :]  # (P, layers, S)
    logits = (
        read.clamp_min(1e-12).log().masked_fill(~objects[rows][:, None, :], float("-inf"))
    )  # (P, layers, S)
    layers = logits.shape[1]
    loss = F.cross_entropy(logits.flatten(0, 1), slot.repeat_interleave(layers))
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == slot[:, None]).float().mean()
    return loss, {"slot_binding_acc": accuracy}
