"""The count loss: the guided clean-target estimate, read by CLIP's label head, holds the scene's object count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.train.config import ConfigError, StageConfig
from blip3o.train.count_supervision import (
    count_error,
    expected_object_count,
    guided_count_loss,
    row_guidance_weights,
    scene_counts,
    shape_count_error,
)
from blip3o.train.data import instruct_examples
from blip3o.train.presets import preset
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS
from blip3o.train.stages import StageModule, fit_feature_statistics
from blip3o.transport import FlowMatchingConfig
from blip3o.world.scene import SHAPES
from conftest import object_instruct_batch, object_slot_model

NONE = PATCH_LABEL_GROUPS[0] - 1  # the "none" shape's channel


def _readings(objectness: list[list[float]]) -> torch.Tensor:
    """(B, N, 19) readings whose shape group is (objectness on "circle", 1 - objectness on "none")."""
    p = torch.tensor(objectness)  # (B, N)
    readings = torch.zeros(*p.shape, 19)
    readings[..., 0], readings[..., NONE] = p, 1.0 - p
    return readings


def test_expected_count_sums_objectness_over_tokens() -> None:
    readings = _readings([[1.0, 0.0, 1.0, 0.0], [0.5, 0.25, 0.0, 0.0]])
    torch.testing.assert_close(expected_object_count(readings), torch.tensor([2.0, 0.75]))


def test_count_error_is_the_mean_absolute_error_over_kept_rows() -> None:
    readings = _readings([[1.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([2, 1, 0])
    loss, metrics = count_error(readings, counts, torch.tensor([True, True, False]))
    torch.testing.assert_close(loss, torch.tensor((1.0 + 0.5) / 2))  # the third row is not kept
    torch.testing.assert_close(metrics["count_bias"], torch.tensor((1.0 - 0.5) / 2))
    exact, _ = count_error(readings, torch.tensor([3, 1, 4]), torch.tensor([True, False, True]))
    assert exact.item() == 0.0
    nothing, _ = count_error(readings, counts, torch.zeros(3, dtype=torch.bool))
    assert nothing.item() == 0.0


def test_shape_count_error_sees_one_shape_drawn_twice() -> None:
    # Two tokens, both certain: row 0 draws two circles, row 1 a circle and a star. The scene of both: a circle
    # and a star. The total is right in both rows; by shape, row 0 is one circle too many and one star short.
    readings = torch.zeros(2, 2, 19)
    readings[0, :, SHAPES.index("circle")] = 1.0
    readings[1, 0, SHAPES.index("circle")], readings[1, 1, SHAPES.index("star")] = 1.0, 1.0
    wanted = torch.zeros(2, len(SHAPES))
    wanted[:, SHAPES.index("circle")], wanted[:, SHAPES.index("star")] = 1.0, 1.0
    loss, metrics = shape_count_error(readings, wanted, torch.tensor([True, True]))
    torch.testing.assert_close(loss, torch.tensor((2.0 + 0.0) / 2))
    torch.testing.assert_close(metrics["count_error"], torch.tensor(0.0))  # what the total-count loss sees
    only_right, _ = shape_count_error(readings, wanted, torch.tensor([False, True]))
    assert only_right.item() == 0.0


def test_scene_counts_by_objects_and_by_shape() -> None:
    # Only the objects' shapes are read: stand-ins with just those keep the test about counting.
    scene = SimpleNamespace(objects=[SimpleNamespace(shape=s) for s in ("star", "star", "circle")])
    scenes = [scene, None]
    assert scene_counts(scenes, "objects").tolist() == [3, 0]
    by_shape = scene_counts(scenes, "shape")
    assert by_shape.shape == (2, len(SHAPES))
    assert by_shape[0, SHAPES.index("star")] == 2 and by_shape[0, SHAPES.index("circle")] == 1
    assert by_shape.sum().item() == 3.0
    with pytest.raises(ValueError, match="objects or shape"):
        scene_counts(scenes, "colour")


def test_guided_estimate_is_read_at_the_samplers_scale_and_only_the_conditional_branch_learns() -> None:
    torch.manual_seed(0)
    model = object_slot_model()
    examples = instruct_examples(0, 1)[:4]
    fit_feature_statistics(model, [e.image for e in examples])
    x0 = torch.randn(4, *model.config.target_shape)  # (B, 19, g, g)
    noise, sigma = torch.randn_like(x0), torch.tensor([0.2, 0.5, 0.8, 1.0])
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    timestep = 1000 * sigma
    condition = model.condition([e.long_caption for e in examples]).float()  # (B, L, H)
    v_cond = model.dit(x_t, timestep, condition).detach().requires_grad_(True)
    counts, keep = torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.bool)
    loss, metrics = guided_count_loss(model, x_t, sigma, timestep, v_cond, condition, counts, keep, 3.0)
    # By hand: the guided velocity, its clean estimate, CLIP's reading of it.
    with torch.no_grad():
        v_uncond = model.dit(x_t, timestep, torch.zeros_like(condition))
    estimate = x_t - sigma.view(-1, 1, 1, 1) * (v_uncond + 3.0 * (v_cond - v_uncond))
    tokens = estimate.flatten(2).transpose(1, 2)  # (B, g*g, 19)
    clip = model.clip
    readings = clip.patch_labels_from_tokens(clip.denormalize_features(clip.target_to_features(tokens)))
    expected, _ = count_error(readings, counts, keep)
    torch.testing.assert_close(loss, expected)
    assert metrics["count_error"] == loss.detach()
    loss.backward()
    assert v_cond.grad is not None and v_cond.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.dit.parameters())  # the null branch runs without a graph


def test_rows_are_guided_as_the_sampler_guides_their_noise_level() -> None:
    sigma = torch.tensor([0.2, 0.5, 0.8, 1.0])
    every_step = row_guidance_weights(sigma, 3.0, FlowMatchingConfig())
    torch.testing.assert_close(every_step, torch.full((4,), 3.0))
    interval = FlowMatchingConfig(cfg_sigma_max=0.7, cfg_outside=0.5)  # 3 up to 0.7, 1 + 0.5 * 2 = 2 above
    torch.testing.assert_close(row_guidance_weights(sigma, 3.0, interval), torch.tensor([3.0, 3.0, 2.0, 2.0]))
    # Each row's guided estimate uses its own weight (checked by hand, as above, at weights 3 and 2).
    torch.manual_seed(0)
    model = object_slot_model()
    examples = instruct_examples(0, 1)[:2]
    fit_feature_statistics(model, [e.image for e in examples])
    x_t = torch.randn(2, *model.config.target_shape)  # (B, 19, g, g)
    sigma, timestep = torch.tensor([0.3, 0.9]), torch.tensor([300.0, 900.0])
    counts, keep = torch.tensor([1, 2]), torch.ones(2, dtype=torch.bool)
    condition = model.condition([e.long_caption for e in examples]).float()  # (B, L, H)
    weights = torch.tensor([3.0, 2.0])
    clip = model.clip
    with torch.no_grad():
        # A fresh DiT ignores its condition (zero-initialised), so the branches are made to differ.
        v_cond = model.dit(x_t, timestep, condition) + torch.randn_like(x_t)  # (B, 19, g, g)
        loss, _ = guided_count_loss(model, x_t, sigma, timestep, v_cond, condition, counts, keep, weights)
        v_uncond = model.dit(x_t, timestep, torch.zeros_like(condition))

        def readings(weight: torch.Tensor) -> torch.Tensor:
            estimate = x_t - sigma.view(-1, 1, 1, 1) * (
                v_uncond + weight.view(-1, 1, 1, 1) * (v_cond - v_uncond)
            )
            tokens = estimate.flatten(2).transpose(1, 2)  # (B, g*g, 19)
            return clip.patch_labels_from_tokens(clip.denormalize_features(clip.target_to_features(tokens)))

        by_hand = readings(weights)
        at_scale = readings(torch.full((2,), 3.0))
    torch.testing.assert_close(loss, count_error(by_hand, counts, keep)[0])
    torch.testing.assert_close(by_hand[0], at_scale[0])  # row 0 is guided at 3 either way
    assert not torch.allclose(by_hand[1], at_scale[1])  # row 1 at 2, not 3: a different reading


def test_instruct_step_with_the_count_loss() -> None:
    model, batch = object_instruct_batch()
    module = StageModule(model, "instruct", count_weight=1.0)
    loss, metrics = module(batch)
    assert {"gen_loss", "count_error", "count_bias"} <= set(metrics)
    torch.testing.assert_close(loss.detach(), metrics["gen_loss"] + metrics["count_error"])
    loss.backward()
    with_count = [p.grad.clone() for p in model.dit.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    StageModule(model, "instruct")(batch)[0].backward()  # the same draws, the flow loss alone
    flow_only = [p.grad for p in model.dit.parameters() if p.grad is not None]
    assert len(with_count) == len(flow_only)
    assert any(not torch.allclose(a, b) for a, b in zip(with_count, flow_only, strict=True))


def test_instruct_step_with_the_count_loss_by_shape() -> None:
    model, batch = object_instruct_batch()
    loss, metrics = StageModule(model, "instruct", count_weight=1.0, count_by="shape")(batch)
    assert {"gen_loss", "shape_count_error", "count_error"} <= set(metrics)
    torch.testing.assert_close(loss.detach(), metrics["gen_loss"] + metrics["shape_count_error"])
    # Summed over shapes, the error is at least the total's (triangle inequality).
    assert metrics["shape_count_error"] >= metrics["count_error"] - 1e-6
    with pytest.raises(ConfigError, match="count_by"):
        StageConfig("ins", "instruct", steps=1, batch_size=1, count_weight=1.0, count_by="colour")


def test_count_weight_checks() -> None:
    with pytest.raises(ConfigError, match="count_weight"):
        StageConfig("gen", "generation", steps=1, batch_size=1, count_weight=1.0)
    with pytest.raises(ConfigError, match="count_weight"):
        StageConfig("ins", "instruct", steps=1, batch_size=1, count_weight=-1.0)
    model = Blip3o.from_config(preset("tiny-test").model, seed=0)  # CLIP without the object label head
    with pytest.raises(ValueError, match="object label head"):
        StageModule(model, "instruct", count_weight=1.0)
