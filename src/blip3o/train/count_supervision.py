"""Instruct stages' count loss: the guided sample's estimate of the clean target holds as many objects as the
scene.

Why: on the object-centric target (`ClipConfig.patch_label_kind = "object"`) a sample holds one object per token,
and the bundled DiT's counting failures are mostly extra objects that guidance adds (bench/token_category.py,
CFG 2 / 3 / 5: 91 / 137 / 196 too many in 300; docs/bench/object_target.txt, sessions 33-34). The flow loss
trains only the conditional branch; nothing sees what guidance makes of it. This loss does: at the batch's own
noise levels it forms the guided velocity ``v_u + w (v_c - v_u)`` at the weight w the sampler uses there (its
scale, or less outside a guidance interval; the unconditional branch without gradient), the clean-target
estimate ``x_t - sigma v`` it implies, and reads that with CLIP's frozen label head. The expected number of
objects (the sum over tokens of one minus the "none" shape probability) is pulled towards the scene's count, as
an absolute error. The count is position-free, so it is
well posed at high noise too, where the layout (and with it the count) is decided.

By shape (`StageConfig.count_by = "shape"`): the expected number of objects of each shape (the sum over tokens
of that shape's probability) is pulled towards the scene's, the absolute errors summed over the shapes. A
two-object sample that draws one shape twice has the right total and the wrong shapes (session 37: 58 of the
bundle's 131 two_object failures on one seed); only this form of the loss sees that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blip3o.models.clip import grid_to_tokens
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, object_label_detections
from blip3o.transport import FlowMatchingConfig, guidance_weight
from blip3o.world.scene import SHAPES


def expected_object_count(readings: Tensor) -> Tensor:
    """(B, N, 19) label-head readings (class groups as probabilities) -> (B,) expected number of objects."""
    no_object = readings[..., PATCH_LABEL_GROUPS[0] - 1]  # (B, N): the "none" shape's probability
    return (1.0 - no_object).sum(dim=-1)


def count_error(readings: Tensor, counts: Tensor, keep: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean |expected count - count| over the kept rows (0 when none is kept), and its signed mean as a metric.

    readings (B, N, 19); counts (B,) objects in each scene; keep (B,) bool: rows whose condition was not dropped
    and whose scene is known."""
    expected = expected_object_count(readings)  # (B,)
    difference = (expected - counts.to(expected)) * keep.to(expected)  # (B,)
    kept = keep.sum().clamp(min=1)
    loss = difference.abs().sum() / kept
    return loss, {"count_error": loss.detach(), "count_bias": (difference.sum() / kept).detach()}


def shape_count_error(
    readings: Tensor, shape_counts: Tensor, keep: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over the kept rows of sum_s |expected count of shape s - its count|, with the total's metrics too.

    readings (B, N, 19); shape_counts (B, S) objects of each shape (SHAPES order, the label head's); keep (B,)."""
    n_shapes = PATCH_LABEL_GROUPS[0] - 1
    expected = readings[..., :n_shapes].sum(dim=1)  # (B, S)
    mask = keep.to(expected)  # (B,)
    kept = keep.sum().clamp(min=1)
    per_row = (expected - shape_counts.to(expected)).abs().sum(dim=-1) * mask  # (B,)
    loss = per_row.sum() / kept
    total = (expected.sum(-1) - shape_counts.to(expected).sum(-1)) * mask  # (B,)
    return loss, {
        "shape_count_error": loss.detach(),
        "count_error": (total.abs().sum() / kept).detach(),
        "count_bias": (total.sum() / kept).detach(),
    }


def read_shape_counts(readings: Tensor) -> Tensor:
    """(B, N, 19) label-head readings -> (B, S) objects of each shape (SHAPES order) as
    `object_label_detections` reads them: hard counts, without gradient."""
    counts = torch.zeros(readings.shape[0], len(SHAPES))  # (B, S)
    for row, reading in enumerate(readings.detach()):
        for found in object_label_detections(reading):
            counts[row, SHAPES.index(found.shape)] += 1
    return counts.to(readings.device)


def outcome_shape_count_error(
    readings: Tensor, finished_counts: Tensor, shape_counts: Tensor, keep: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The own count loss towards the finished sample's error: each shape the finished sample miscounts pulls
    the expected count of the reading part-way along its trajectory by one per object, in the direction that
    mends it; shapes it counts right do not pull.

    Why: pulling the high-noise estimate's expected count to the scene's (`shape_count_error`) over-counts in
    the end (session 59: a second 1,000 steps of the bundle's count_apart logged the estimate under-reading by
    ~0.2 objects on average while "three" came out as four in 81 of 100 probes): a blurred estimate's soft count
    is not the count its sample ends with. Here the finished sample says which way to go.

    readings (B, N, 19) with their graph; finished_counts, shape_counts (B, S): the finished sample's read counts
    (`read_shape_counts`) and the scene's; keep (B,). The value is the finished samples' summed count error per
    kept row (the gradient with respect to each expected count is the sign of its shape's error)."""
    n_shapes = PATCH_LABEL_GROUPS[0] - 1
    expected = readings[..., :n_shapes].sum(dim=1)  # (B, S)
    error = (finished_counts - shape_counts).to(expected)  # (B, S)
    mask = keep.to(expected)  # (B,)
    kept = keep.sum().clamp(min=1)
    # |e - e.detach() + error| has the value |error| and the gradient sign(error) (0 where it is 0).
    per_row = (expected - expected.detach() + error).abs().sum(dim=-1) * mask  # (B,)
    loss = per_row.sum() / kept
    total = error.sum(-1) * mask  # (B,)
    return loss, {
        "outcome_shape_count_error": loss.detach(),
        "outcome_count_bias": (total.sum() / kept).detach(),
    }


def scene_counts(scenes: list, by: str) -> Tensor:
    """What the count loss compares with: (B,) objects per scene for by "objects", (B, S) objects of each shape
    (SHAPES order) for "shape". A missing scene (None) counts nothing; its row must not be kept."""
    if by == "objects":
        return torch.tensor([len(scene.objects) if scene else 0 for scene in scenes])
    if by != "shape":
        raise ValueError(f"count by must be objects or shape, got {by!r}")
    counts = torch.zeros(len(scenes), len(SHAPES))  # (B, S)
    for row, scene in enumerate(scenes):
        for obj in scene.objects if scene else ():
            counts[row, SHAPES.index(obj.shape)] += 1
    return counts


def row_guidance_weights(sigma: Tensor, cfg_scale: float, flow: FlowMatchingConfig) -> Tensor:
    """(B,) noise levels -> (B,) the guidance weight the sampler applies at each (`guidance_weight`): with a
    guidance interval set (FlowMatchingConfig.cfg_sigma_min / max / cfg_outside) the loss sees the guidance the
    sampler uses at that level, not the full scale everywhere."""
    weights = [guidance_weight(level, cfg_scale, flow) for level in sigma.detach().float().cpu().tolist()]
    return torch.tensor(weights, dtype=torch.float32, device=sigma.device)


def guided_readings(
    model,
    x_t: Tensor,
    sigma: Tensor,
    timestep: Tensor,
    v_cond: Tensor,
    condition: Tensor,
    cfg_scale: float | Tensor,
) -> Tensor:
    """CLIP's label-head reading (B, N, 19) of the clean target that guidance implies at each row's noise level.

    x_t, v_cond (B, C, g, g): the noised targets and the DiT's conditional velocity (with its graph);
    sigma, timestep (B,); condition (B, L, H); cfg_scale: one guidance weight, or (B,) one per row
    (`row_guidance_weights`: the sampler's weight at each row's noise level)."""
    with torch.no_grad():
        v_uncond = model.dit(x_t, timestep, torch.zeros_like(condition))  # (B, C, g, g)
    weight = torch.as_tensor(cfg_scale, dtype=torch.float32, device=x_t.device).reshape(
        -1, 1, 1, 1
    )  # (B|1,1,1,1)
    guided = v_uncond + weight * (v_cond.float() - v_uncond.float())  # (B, C, g, g)
    estimate = x_t.float() - sigma.view(-1, 1, 1, 1) * guided  # (B, C, g, g): x0 = x_t - sigma v
    return model.clip.patch_labels_from_target(grid_to_tokens(estimate))  # (B, N, 19)


def guided_count_loss(
    model,
    x_t: Tensor,
    sigma: Tensor,
    timestep: Tensor,
    v_cond: Tensor,
    condition: Tensor,
    counts: Tensor,
    keep: Tensor,
    cfg_scale: float | Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The count loss of one flow-matching batch (see the module docstring): `guided_readings`, then
    `count_error`, or `shape_count_error` when counts is (B, S) per shape; counts (B,) otherwise, keep (B,)."""
    readings = guided_readings(model, x_t, sigma, timestep, v_cond, condition, cfg_scale)  # (B, N, 19)
    return counted_error(readings, counts, keep)


def counted_error(readings: Tensor, counts: Tensor, keep: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """`shape_count_error` for (B, S) counts, `count_error` for (B,) counts."""
    if counts.ndim == 2:
        return shape_count_error(readings, counts, keep)
    return count_error(readings, counts, keep)
