"""The separation loss: two objects the guided estimate names may not come closer than ShapesWorld keeps them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens
from blip3o.train.config import ConfigError, StageConfig
from blip3o.train.count_supervision import (
    outcome_shape_count_error,
    read_shape_counts,
    scene_counts,
    shape_count_error,
)
from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import preset
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, object_label_detections, scene_object_labels
from blip3o.train.separation_supervision import (
    SEPARATION_MARGIN,
    finish_own_trajectory,
    own_trajectory_readings,
    own_trajectory_state,
    read_boxes,
    separation_error,
)
from blip3o.train.stages import StageModule
from blip3o.transport import initial_noise, sample_euler, sampling_schedule
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import load_train_prompts
from blip3o.world.scene import SHAPES, box_gap
from conftest import object_instruct_batch, object_slot_model

GRID = 8  # 64 px images, 8 px patches
N_SHAPES, N_COLOURS = PATCH_LABEL_GROUPS  # each with its "none" last
DX, SIDE = N_SHAPES + N_COLOURS, N_SHAPES + N_COLOURS + 2  # value channels: dx, dy, side, rotation


def _two_objects(col_b: int, dx_a: float = 0.0, dx_b: float = 0.0, side: float = 0.0) -> torch.Tensor:
    """(1, 64, 19) exact labels: a circle centred in patch (3, 1) and a star in patch (3, col_b), x offsets in
    half patches, the same mean side value for both ([-1, 1] over the box range)."""
    labels = torch.zeros(1, GRID * GRID, 19)
    labels[..., N_SHAPES - 1], labels[..., DX - 1] = 1.0, 1.0  # every patch "none" (shape, colour)
    for col, shape, dx in ((1, "circle", dx_a), (col_b, "star", dx_b)):
        token = labels[0, 3 * GRID + col]
        token[N_SHAPES - 1], token[DX - 1] = 0.0, 0.0
        token[SHAPES.index(shape)], token[N_SHAPES] = 1.0, 1.0  # the shape, the first colour
        token[DX], token[SIDE] = dx, side
    return labels


def test_read_boxes_are_the_detections_boxes() -> None:
    labels = _two_objects(col_b=4, dx_a=0.5, dx_b=-0.25, side=0.3)
    centres, sides, objects = read_boxes(labels)
    detections = object_label_detections(labels[0])
    assert objects.sum().item() == len(detections) == 2
    for detection, token in zip(detections, objects[0].nonzero().flatten().tolist(), strict=True):
        x0, y0, x1, y1 = detection.box
        torch.testing.assert_close(centres[0, token], torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2]))
        torch.testing.assert_close(sides[0, token], torch.tensor(x1 - x0))


def test_real_scenes_cost_nothing_and_overlap_costs_its_shortfall() -> None:
    # Exact labels of ShapesWorld scenes that name several objects: their read (square) boxes keep the margin.
    rng = np.random.default_rng(0)
    records = [r for r in load_train_prompts() if r["tag"] in ("counting", "two_object")]
    labels = torch.stack([scene_object_labels(scene_for_prompt(records[i], rng), GRID) for i in range(60)])
    loss, metrics = separation_error(labels, torch.ones(60, dtype=torch.bool), margin=1.0)
    assert loss.item() == 0.0 and metrics["close_pairs"].item() == 0.0
    # Two objects two patches apart, both of the largest side (22 px): centres 16 px apart, boxes overlap by 6.
    close = _two_objects(col_b=3, side=1.0)
    loss, metrics = separation_error(close, torch.tensor([True]))
    detections = object_label_detections(close[0])
    gap = box_gap(detections[0].box, detections[1].box)
    assert gap == pytest.approx(-6.0)
    torch.testing.assert_close(loss, torch.tensor((SEPARATION_MARGIN - gap) / 8.0))
    assert metrics["close_pairs"].item() == 1.0
    assert separation_error(close, torch.tensor([False]))[0].item() == 0.0  # a row not kept costs nothing
    far = _two_objects(col_b=5, side=1.0)  # centres 32 px apart: a 10 px gap
    assert separation_error(far, torch.tensor([True]))[0].item() == 0.0


def test_the_gradient_moves_the_pair_apart_and_shrinks_it_only_if_asked() -> None:
    left, right = 3 * GRID + 1, 3 * GRID + 3
    for shrink in (False, True):
        labels = _two_objects(col_b=3, side=0.5).requires_grad_(True)
        separation_error(labels, torch.tensor([True]), shrink=shrink)[0].backward()
        grad = labels.grad[0]  # descent goes against it
        assert grad[left, DX] > 0 and grad[right, DX] < 0  # the left one moves left, the right one right
        assert grad[:, :DX].abs().sum() == 0  # no object is removed or relabelled
        if shrink:
            assert grad[left, SIDE] > 0 and grad[right, SIDE] > 0  # both shrink
        else:
            assert grad[:, SIDE].abs().sum() == 0  # sizes are left alone


def test_euler_sampling_can_stop_part_way() -> None:
    torch.manual_seed(0)
    model = object_slot_model()
    condition = model.condition(["a red circle", "two stars"]).float()  # (R, L, H)
    noise = initial_noise((2, *model.config.target_shape), torch.Generator().manual_seed(1))
    states = {}
    full = sample_euler(
        model.dit, noise, condition, model.config.flow, callback=lambda k, x: states.update({k: x})
    )
    steps = model.config.flow.sample_steps
    torch.testing.assert_close(
        sample_euler(model.dit, noise, condition, model.config.flow, end_step=steps), full
    )
    torch.testing.assert_close(
        sample_euler(model.dit, noise, condition, model.config.flow, end_step=0), noise
    )
    torch.testing.assert_close(
        sample_euler(model.dit, noise, condition, model.config.flow, end_step=3), states[2]
    )
    with pytest.raises(ValueError, match="end_step"):
        sample_euler(model.dit, noise, condition, model.config.flow, end_step=steps + 1)


def test_own_trajectory_state_is_where_the_sampler_stands() -> None:
    torch.manual_seed(0)
    model = object_slot_model()
    condition = model.condition(["a red circle", "two stars"]).float()  # (R, L, H)
    state, sigma, timestep = own_trajectory_state(model, condition, torch.Generator().manual_seed(5))
    # The same draws by hand: the step first, then the noise, from one generator.
    generator = torch.Generator().manual_seed(5)
    schedule = sampling_schedule(None, model.config.flow)
    step = int(torch.randint(len(schedule.network_timesteps), (), generator=generator))
    noise = initial_noise((2, *model.config.target_shape), generator)
    expected = sample_euler(model.dit, noise, condition, model.config.flow, end_step=step)
    torch.testing.assert_close(state, expected)
    assert sigma.tolist() == [schedule.sigmas[step].item()] * 2
    assert timestep.tolist() == [schedule.network_timesteps[step].item()] * 2


def test_own_trajectory_step_can_be_kept_to_high_noise() -> None:
    torch.manual_seed(0)
    model = object_slot_model()
    condition = model.condition(["two stars"]).float()  # (R, L, H)
    schedule = sampling_schedule(None, model.config.flow)
    high = int((schedule.sigmas[:-1] >= 0.6).sum())
    assert 1 < high < len(schedule.network_timesteps)  # the check below can fail
    drawn = set()
    for seed in range(40):
        _, sigma, _ = own_trajectory_state(
            model, condition, torch.Generator().manual_seed(seed), min_sigma=0.6
        )
        drawn.add(round(sigma[0].item(), 6))
    assert min(drawn) >= 0.6 and len(drawn) > 1
    # Every one of those steps and none below: the draw is uniform over the high steps.
    assert drawn == {round(s, 6) for s in schedule.sigmas[:high].tolist()}
    with pytest.raises(ConfigError, match="own_min_sigma"):
        StageConfig("ins", "instruct", steps=1, batch_size=1, own_min_sigma=1.0)


def _counting_rows(model: Blip3o) -> tuple[list, torch.Tensor]:
    """Two counting training prompts: their scenes (exactly the prompt's objects) and conditions (R, L, H)."""
    records = [r for r in load_train_prompts() if r["tag"] == "counting"][:2]
    scenes = [scene_for_prompt(r, np.random.default_rng(i), distractors=0) for i, r in enumerate(records)]
    return scenes, model.condition([r["prompt"] for r in records]).float()


def test_finishing_the_own_trajectory_is_the_sampler_s_whole_trajectory() -> None:
    torch.manual_seed(0)
    model = object_slot_model()
    condition = model.condition(["a red circle", "two stars"]).float()  # (R, L, H)
    schedule = sampling_schedule(None, model.config.flow)
    steps = []
    for seed in (5, 6, 7):  # several drawn steps
        # The draws own_trajectory_state makes, in its order: the step, then the initial noise.
        generator = torch.Generator().manual_seed(seed)
        steps.append(int(torch.randint(len(schedule.network_timesteps), (), generator=generator)))
        noise = initial_noise((2, *model.config.target_shape), generator)
        whole = sample_euler(model.dit, noise, condition, model.config.flow)  # (R, C, g, g)
        state, sigma, _ = own_trajectory_state(model, condition, torch.Generator().manual_seed(seed))
        finished = finish_own_trajectory(model, state, sigma, condition)
        torch.testing.assert_close(finished, whole)
    assert any(step > 0 for step in steps)  # the checks went on part-way, not only from pure noise


def test_the_outcome_count_loss_pulls_only_miscounted_shapes_and_the_mending_way() -> None:
    n_shapes = N_SHAPES - 1
    readings = torch.rand(2, GRID * GRID, 19, requires_grad=True)
    wanted = torch.zeros(2, n_shapes)
    wanted[:, 0] = 3.0  # three of the first shape in both rows
    finished = wanted.clone()
    finished[0, 0] = 4.0  # row 0 ends with one too many; row 1 right
    finished[0, 2] = 1.0  # and an extra object of another shape
    everyone = torch.ones(2, dtype=torch.bool)
    loss, metrics = outcome_shape_count_error(readings, finished, wanted, everyone)
    assert loss.item() == 1.0  # (1 + 1 + 0) / 2 rows
    assert metrics["outcome_count_bias"].item() == 1.0
    loss.backward()
    grad = readings.grad[..., :n_shapes]  # (2, N, S): d loss / d each token's shape probability
    torch.testing.assert_close(grad[0, :, 0], torch.full((GRID * GRID,), 0.5))  # push the first shape down
    torch.testing.assert_close(grad[0, :, 2], torch.full((GRID * GRID,), 0.5))
    assert grad[0, :, 1].abs().sum() == 0 and grad[1].abs().sum() == 0  # right counts: no pull
    # The read counts come from the detection rule: exact labels of two objects read as one of each.
    counts = read_shape_counts(_two_objects(col_b=5))
    assert (
        counts[0, SHAPES.index("circle")] == 1 and counts[0, SHAPES.index("star")] == 1 and counts.sum() == 2
    )


def test_the_outcome_count_target_reaches_the_stage() -> None:
    torch.manual_seed(0)
    model, _ = object_instruct_batch()
    scenes, condition = _counting_rows(model)
    module = StageModule(model, "instruct", own_count_weight=0.5, own_count_target="outcome")
    loss, metrics = module._own_trajectory_loss(condition, scenes, seed=3)
    # By hand: the same own reading, its trajectory finished, the finished sample's counts against the scenes'.
    reading = own_trajectory_readings(model, condition, seed=3)
    finished = finish_own_trajectory(model, reading.state, reading.sigma, condition)
    counts = read_shape_counts(model.clip.patch_labels_from_target(grid_to_tokens(finished)))
    expected, _ = outcome_shape_count_error(
        reading.readings, counts, scene_counts(scenes, "shape"), torch.ones(2, dtype=torch.bool)
    )
    torch.testing.assert_close(loss, 0.5 * expected)
    assert "own_outcome_shape_count_error" in metrics
    with pytest.raises(ValueError, match="own_count_target"):
        StageModule(model, "instruct", own_count_weight=0.5, own_count_target="final")
    with pytest.raises(ConfigError, match="own_count_target"):
        StageConfig("ins", "instruct", steps=1, batch_size=1, own_count_target="final")


def test_instruct_step_with_the_separation_loss() -> None:
    model, batch = object_instruct_batch()
    loss, metrics = StageModule(model, "instruct", count_weight=1.0, separation_weight=2.0)(batch)
    assert {"gen_loss", "count_error", "separation_error", "close_pairs", "own_sigma"} <= set(metrics)
    expected = metrics["gen_loss"] + metrics["count_error"] + 2.0 * metrics["separation_error"]
    torch.testing.assert_close(loss.detach(), expected)
    alone, alone_metrics = StageModule(model, "instruct", separation_weight=1.0)(batch)
    assert "count_error" not in alone_metrics
    torch.testing.assert_close(alone.detach(), alone_metrics["gen_loss"] + alone_metrics["separation_error"])
    torch.testing.assert_close(alone_metrics["separation_error"], metrics["separation_error"])


def test_own_count_loss_reads_the_same_own_sample() -> None:
    torch.manual_seed(0)
    model, _ = object_instruct_batch()
    scenes, condition = _counting_rows(model)
    both = StageModule(model, "instruct", separation_weight=2.0, own_count_weight=0.5)
    loss, metrics = both._own_trajectory_loss(condition, scenes, seed=3)
    # By hand: one reading of the own trajectory, each loss on it.
    readings, sigma, _ = own_trajectory_readings(model, condition, seed=3)
    everyone = torch.ones(2, dtype=torch.bool)
    apart, _ = separation_error(readings, everyone)
    counted, _ = shape_count_error(readings, scene_counts(scenes, "shape"), everyone)
    assert counted.item() > 0  # an untrained DiT does not draw the prompt's count: the check can fail
    torch.testing.assert_close(loss, 2.0 * apart + 0.5 * counted)
    torch.testing.assert_close(metrics["own_shape_count_error"], counted.detach())
    assert metrics["own_sigma"].item() == sigma[0].item()
    alone, alone_metrics = StageModule(model, "instruct", own_count_weight=0.5)._own_trajectory_loss(
        condition, scenes, seed=3
    )
    assert "separation_error" not in alone_metrics
    torch.testing.assert_close(alone, 0.5 * counted)
    alone.backward()  # the gradient reaches the DiT through the conditional velocity
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.parameters())


def test_instruct_step_with_the_own_count_loss() -> None:
    model, batch = object_instruct_batch()
    loss, metrics = StageModule(model, "instruct", own_count_weight=0.5)(batch)
    assert {"gen_loss", "own_shape_count_error", "own_count_bias", "own_sigma"} <= set(metrics)
    torch.testing.assert_close(loss.detach(), metrics["gen_loss"] + 0.5 * metrics["own_shape_count_error"])


@pytest.mark.parametrize("name", ["separation_weight", "own_count_weight"])
def test_own_trajectory_weight_checks(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        StageConfig("gen", "generation", steps=1, batch_size=1, **{name: 1.0})
    with pytest.raises(ConfigError, match=name):
        StageConfig("ins", "instruct", steps=1, batch_size=1, **{name: -1.0})
    model = Blip3o.from_config(preset("tiny-test").model, seed=0)  # CLIP without the object label head
    with pytest.raises(ValueError, match="object label head"):
        StageModule(model, "instruct", **{name: 1.0})
    with pytest.raises(ConfigError, match="FSDP"):
        apply_overrides(preset("shapes-object"), ["distributed=fsdp", f"stages.count.{name}=0.3"])


def test_a_wider_separation_margin_costs_more_and_reaches_the_stage() -> None:
    # Largest-side objects (22 px) with centres 24 px apart: a 2 px gap, at ShapesWorld's own margin.
    labels = _two_objects(col_b=4, side=1.0)
    assert separation_error(labels, torch.tensor([True]), margin=SEPARATION_MARGIN)[0].item() == 0.0
    wide, metrics = separation_error(labels, torch.tensor([True]), margin=5.0)
    torch.testing.assert_close(wide, torch.tensor(3.0 / 8.0))  # 3 px short, in 8 px patches
    assert metrics["close_pairs"].item() == 1.0
    # The stage's margin is the one its loss uses: the same own reading, costed at each margin by hand.
    torch.manual_seed(0)
    model, _ = object_instruct_batch()
    condition = model.condition(["two stars", "three circles"]).float()  # (R, L, H)
    readings = own_trajectory_readings(model, condition, seed=3).readings
    everyone = torch.ones(2, dtype=torch.bool)
    losses = []
    for margin in (SEPARATION_MARGIN, 30.0):
        module = StageModule(model, "instruct", separation_weight=1.0, separation_margin=margin)
        loss, _ = module._own_trajectory_loss(condition, [], seed=3)
        torch.testing.assert_close(loss, separation_error(readings, everyone, margin)[0])
        losses.append(loss.item())
    # The reading holds a pair closer than 30 px: the two margins give different losses.
    assert losses[1] > losses[0]
    with pytest.raises(ConfigError, match="separation_margin"):
        StageConfig("ins", "instruct", steps=1, batch_size=1, separation_weight=1.0, separation_margin=0.0)
    config = apply_overrides(preset("shapes-object-v2"), ["stages.count_apart.separation_margin=4"])
    assert config.stage("count_apart").separation_margin == 4.0
