"""The slot binding loss: the DiT's token holding the k-th named object reads slot k (generation stages)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.models.dit import DiT, DiTConfig
from blip3o.train.config import ConfigError, StageConfig
from blip3o.train.data import instruct_examples, make_batch
from blip3o.train.presets import preset
from blip3o.train.slot_supervision import UNNAMED, caption_slot_cells, slot_binding_loss
from blip3o.train.stages import StageModule, fit_feature_statistics, set_trainable
from blip3o.world.scene import Scene, SceneObject


def _object(shape: str, color: str, x: float, y: float, side: float = 12.0) -> SceneObject:
    half = side / 2
    return SceneObject(shape, color, (0, 0, 0), (x, y), 0.0, 1.0, (x - half, y - half, x + half, y + half))


# 64 px, a 4 x 4 grid of 16 px cells: the star's centre in cell (row 0, col 3), the circle's in (2, 1).
SCENE = Scene((255, 255, 255), (_object("star", "red", 56.0, 8.0), _object("circle", "blue", 20.0, 40.0)))


def test_slot_cells_follow_the_caption_order_not_the_scene_order() -> None:
    cells = caption_slot_cells("a photo of a blue circle below a red star", 4, SCENE, grid=4)
    assert cells.tolist() == [2 * 4 + 1, 0 * 4 + 3, UNNAMED, UNNAMED]
    # Bare shapes match too; a named object the scene lacks has no cell.
    assert caption_slot_cells("a photo of a star and a square", 3, SCENE, 4).tolist() == [3, UNNAMED, UNNAMED]


def test_left_to_right_order_gives_alike_objects_slots_by_x_and_changes_nothing_else() -> None:
    # Three red stars listed right, left, middle; a blue circle first in the scene. Grid 4: cells 16 px wide.
    stars = [_object("star", "red", x, 40.0) for x in (56.0, 8.0, 40.0)]
    scene = Scene((255, 255, 255), (_object("circle", "blue", 24.0, 8.0), *stars))
    caption = "a photo of three red stars"
    by_scene = caption_slot_cells(caption, 4, scene, grid=4)
    by_x = caption_slot_cells(caption, 4, scene, grid=4, order="left_to_right")
    assert by_scene.tolist() == [2 * 4 + 3, 2 * 4 + 0, 2 * 4 + 2, UNNAMED]
    assert by_x.tolist() == [2 * 4 + 0, 2 * 4 + 2, 2 * 4 + 3, UNNAMED]
    # Objects named apart match the same scene objects in either order.
    other = "a photo of a red star above a blue circle"
    assert (
        caption_slot_cells(other, 3, SCENE, 4, "left_to_right").tolist()
        == caption_slot_cells(other, 3, SCENE, 4).tolist()
    )
    with pytest.raises(ValueError, match="order"):
        caption_slot_cells(caption, 4, scene, 4, order="raster")


def _attention(
    own: float, batch: int = 1, layers: int = 2, heads: int = 2, slots: int = 4
) -> list[torch.Tensor]:
    """Weights where every token puts `own` on slot 0 if it sits in the circle's cell, on slot 1 if in the
    star's (the caption's order above), and the rest spread over the other slots."""
    weights = torch.full((batch, heads, 16, slots), 1.0 / slots)
    for cell, slot in ((9, 0), (3, 1)):
        weights[:, :, cell] = (1 - own) / (slots - 1)
        weights[:, :, cell, slot] = own
    return [weights.clone().requires_grad_() for _ in range(layers)]


def test_binding_loss_is_the_cross_entropy_among_the_objects_slots_only() -> None:
    caption = "a photo of a blue circle below a red star"
    keep = torch.tensor([True])
    # Renormalised over the two objects' slots: own weight 0.4 against (1 - 0.4) / 3 = 0.2 on the other's.
    loss, metrics = slot_binding_loss(_attention(0.4), [caption], [SCENE], keep)
    torch.testing.assert_close(loss, torch.tensor(-math.log(0.4 / 0.6)))
    assert metrics["slot_binding_acc"].item() == 1.0
    # The other object's slot preferred: every token wrong, and the loss higher.
    wrong, wrong_metrics = slot_binding_loss(_attention(0.1), [caption], [SCENE], keep)
    assert wrong > loss and wrong_metrics["slot_binding_acc"].item() == 0.0
    torch.testing.assert_close(wrong, torch.tensor(-math.log(0.1 / 0.4)))


def test_binding_loss_skips_dropped_rows_and_single_objects_and_keeps_the_graph() -> None:
    weights = _attention(0.1, batch=2)
    captions = ["a photo of a blue circle below a red star", "a photo of a star"]
    loss, _ = slot_binding_loss(weights, captions, [SCENE, SCENE], torch.tensor([True, True]))
    torch.testing.assert_close(loss, torch.tensor(-math.log(0.1 / 0.4)))  # the one-object row adds nothing
    empty, metrics = slot_binding_loss(weights, captions, [SCENE, SCENE], torch.tensor([False, True]))
    assert empty.item() == 0.0 and set(metrics) == {"slot_binding_acc"}
    empty.backward()  # still part of the graph (DDP expects every parameter's gradient)
    assert weights[0].grad is not None
    with pytest.raises(ValueError, match="scene"):
        slot_binding_loss(weights, captions, [SCENE, None], torch.tensor([True, True]))
    with pytest.raises(ValueError, match="captions"):
        slot_binding_loss(weights, captions[:1], [SCENE], torch.tensor([True]))


def test_dit_records_its_cross_attention_without_changing_its_output() -> None:
    torch.manual_seed(0)
    dit = DiT(DiTConfig.tiny(condition_slots=3, cross_attention_gate_init=0.5))
    x, t, condition = torch.randn(2, 32, 4, 4), torch.tensor([100.0, 700.0]), torch.randn(2, 5, 48)
    maps: list[torch.Tensor] = []
    torch.testing.assert_close(dit(x, t, condition, maps), dit(x, t, condition))
    assert len(maps) == dit.config.n_layers
    dit(x, t, condition)  # a later forward without a list records nothing more, nor into the old list
    assert len(maps) == dit.config.n_layers
    assert all(layer.cross_attention_record is None for layer in dit.model.layers)
    for weights in maps:
        assert weights.shape == (2, dit.config.n_heads, 16, 3)  # over the resampler's slots
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, dit.config.n_heads, 16))
    dit.gradient_checkpointing = True
    with pytest.raises(ValueError, match="checkpointing"):
        dit(x, t, condition, [])


def test_binding_weight_checks() -> None:
    with pytest.raises(ConfigError, match="slot_binding_weight"):
        StageConfig("dec", "decoder", steps=1, batch_size=1, slot_binding_weight=1.0)
    with pytest.raises(ConfigError, match="slot_binding_weight"):
        StageConfig("gen", "generation", steps=1, batch_size=1, slot_binding_weight=-1.0)
    with pytest.raises(ConfigError, match="slot_binding_order must be one of"):
        StageConfig(
            "gen", "generation", steps=1, batch_size=1, slot_binding_weight=1.0, slot_binding_order="x"
        )
    with pytest.raises(ConfigError, match="only with slot_binding_weight"):
        StageConfig("gen", "generation", steps=1, batch_size=1, slot_binding_order="left_to_right")
    model = Blip3o.from_config(preset("tiny-test").model, seed=0)  # no resampler
    with pytest.raises(ValueError, match="resampler"):
        StageModule(model, "instruct", slot_binding_weight=1.0)


def test_instruct_step_with_the_binding_loss_trains_the_cross_attention() -> None:
    base = preset("tiny-test")
    model = Blip3o.from_config(replace(base.model, dit=replace(base.model.dit, condition_slots=4)), seed=0)
    examples = [e for e in instruct_examples(0, 1) if " left of " in e.long_caption][:4]
    fit_feature_statistics(model, [e.image for e in examples])
    module = StageModule(model, "instruct", slot_binding_weight=1.0)
    set_trainable(model, "instruct")
    batch = make_batch("instruct", examples, list(range(4)), list(range(4)), seed=0, short_prob=0.0)
    loss, metrics = module(batch)
    assert {"slot_binding_acc", "gen_loss"} <= set(metrics)
    assert loss > metrics["gen_loss"]  # the binding term is in the loss
    loss.backward()
    # The keys of the cross-attention learn which slot to read; the self-attention gets the flow loss only.
    assert all(layer.attn2.to_k.weight.grad.abs().sum() > 0 for layer in model.dit.model.layers)
