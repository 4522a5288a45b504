"""Instruct stages' separation loss: two objects the DiT draws keep apart as ShapesWorld's objects do.

Why: ShapesWorld never draws two objects closer than 2 px (box to box), but the DiT's tokens can name two objects
whose boxes overlap; the pixel decoder then draws one blob, and a count the tokens got right is lost in the image.
Measured on the bundle's run (session 54, `bench/token_category.py --pixels --gaps --seeds 10`): of the counting samples whose tokens pass
and whose pixels fail, 63% have two read boxes overlapping (median closest gap -2.1 px), against 21% (3.2 px)
where both pass; two_object: 67% closer than 2 px against 24%.

The loss is taken on the model's own trajectory, not on noised real targets: the clean-target estimate from a
real target noised to any level keeps that target's (well separated) layout, so the overlaps the sampler makes
never show there (a first try read the count loss's estimate: close pairs in 1 batch of 6 logged). Here a few
rows of each batch are sampled from noise with the model's own steps and guidance, without gradient, up to a
step drawn per batch; at that state the guided velocity (conditional branch with its graph) gives the clean
estimate, CLIP's frozen label head reads it, and each pair of read objects (the detection rule's peaks, chosen
without gradient) whose read boxes (centre + mean side) come closer than the margin costs the shortfall, in
patches. The gradient moves the two centres apart; it never resizes, removes or relabels an object (a first
version also let it shrink the boxes: the DiT then drew every object smaller, single objects included).
The same reading serves the own count loss (StageModule: the count loss by shape taken there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from blip3o.train.count_supervision import guided_readings, row_guidance_weights
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, object_tokens, read_centre, read_side
from blip3o.transport import initial_noise, sample_euler, sampling_schedule
from blip3o.world.scene import IMAGE_SIZE

SEPARATION_MARGIN = 2.0  # px between two read boxes below which a pair costs (ShapesWorld keeps >= 2 px)


def read_boxes(readings: Tensor, size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 19) readings -> the box each token would name, as `object_label_detections` reads it: centres
    (B, N, 2) in pixels and mean sides (B, N), both differentiable, and which tokens are objects (B, N) bool,
    without gradient (likeliest shape not "none", and the object probability peaking in its 3 x 3 patches)."""
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    tokens = readings.shape[1]
    grid = math.isqrt(tokens)
    with torch.no_grad():
        objects = object_tokens(readings)  # (B, N)
    index = torch.arange(tokens, device=readings.device)
    col, row = (index % grid).to(readings.dtype), (index // grid).to(readings.dtype)  # (N,)
    values = readings[..., n_shapes + n_colours :]  # (B, N, 4): dx, dy (half patches), side, rotation
    centres = torch.stack(
        read_centre(col, row, values[..., 0], values[..., 1], size / grid), dim=-1
    )  # (B, N, 2)
    return centres, read_side(values[..., 2]), objects  # (B, N, 2), (B, N), (B, N)


def separation_error(
    readings: Tensor,
    keep: Tensor,
    margin: float = SEPARATION_MARGIN,
    size: int = IMAGE_SIZE,
    shrink: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over the kept rows of the summed shortfall, in patches, of every pair of read objects whose boxes
    are less than `margin` px apart (`box_gap`'s rule: the larger of the x and y gaps; negative on overlap).

    readings (B, N, 19); keep (B,) bool. Metric "close_pairs": such pairs per kept row. The gradient moves the
    centres only; with `shrink` it also shrinks the boxes, which the DiT learnt as a shrink of every object it
    draws (session 54: mean side -0.8 px in every category, single objects lost more often)."""
    centres, sides, objects = read_boxes(readings, size)  # (B, N, 2), (B, N), (B, N)
    if not shrink:
        sides = sides.detach()
    cell = size / math.isqrt(readings.shape[1])
    apart = (centres[:, :, None, :] - centres[:, None, :, :]).abs()  # (B, N, N, 2)
    reach = (sides[:, :, None] + sides[:, None, :]) / 2  # (B, N, N)
    gap = (apart - reach[..., None]).amax(dim=-1)  # (B, N, N)
    pairs = objects[:, :, None] & objects[:, None, :]  # (B, N, N)
    pairs = torch.triu(pairs, diagonal=1) & keep.bool().to(pairs.device)[:, None, None]
    shortfall = F.relu(margin - gap) / cell * pairs  # (B, N, N)
    kept = keep.sum().clamp(min=1)
    close = ((gap < margin) & pairs).sum()
    return shortfall.sum() / kept, {"separation_error": (shortfall.sum() / kept).detach(),
                                     "close_pairs": (close / kept).detach()}  # fmt: skip


@torch.no_grad()
def own_trajectory_state(
    model, condition: Tensor, generator: torch.Generator, min_sigma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Where the model's own sampler stands after a step drawn from `generator` (0 .. steps - 1, among the steps
    whose noise level is >= `min_sigma`): the state (R, C, g, g), its noise level (R,) and the network timestep
    (R,) the sampler feeds there. condition (R, L, H); the model's sampling steps and guidance
    (FlowMatchingConfig.sample_steps / cfg_scale)."""
    flow = model.config.flow
    schedule = sampling_schedule(None, flow)
    # the grid descends from 1, so the allowed steps are its first ones (at least step 0, at sigma 1)
    allowed = max(1, int((schedule.sigmas[:-1] >= min_sigma).sum()))
    step = int(torch.randint(allowed, (), generator=generator))
    rows = condition.shape[0]
    noise = initial_noise((rows, *model.config.target_shape), generator).to(condition.device)  # (R, C, g, g)
    state = sample_euler(model.dit, noise, condition, flow, end_step=step)  # (R, C, g, g)
    sigma = schedule.sigmas[step].to(condition.device).expand(rows)  # (R,)
    timestep = schedule.network_timesteps[step].to(condition.device).expand(rows)  # (R,)
    return state, sigma, timestep


class OwnReading(NamedTuple):
    """One read of the model's own trajectory (`own_trajectory_readings`)."""

    readings: (
        Tensor  # (R, N, 19) the label head's reading of the guided clean-target estimate, with its graph
    )
    sigma: Tensor  # (R,) the drawn step's noise level
    state: Tensor  # (R, C, g, g) where the sampler stood, without gradient (`finish_own_trajectory` goes on)


def own_trajectory_readings(model, condition: Tensor, seed: int, min_sigma: float = 0.0) -> OwnReading:
    """CLIP's label-head reading (R, N, 19) of the guided clean-target estimate where the model's own sampler
    stands after a drawn step, for the (R, L, H) conditions, with the graph through the conditional velocity;
    that step's noise level (R,) and the state. `seed` draws the noise and the step (a batch's seed: resumed
    runs redraw the same); `min_sigma` restricts the step (own_trajectory_state). Both own-trajectory losses read
    it: the separation loss and the own count loss."""
    generator = torch.Generator().manual_seed(seed)
    state, sigma, timestep = own_trajectory_state(model, condition, generator, min_sigma)
    velocity = model.dit(state, timestep, condition)  # (R, C, g, g), with its graph
    weights = row_guidance_weights(sigma, model.config.flow.cfg_scale, model.config.flow)  # (R,)
    readings = guided_readings(model, state, sigma, timestep, velocity, condition, weights)  # (R, N, 19)
    return OwnReading(readings, sigma, state)


@torch.no_grad()
def finish_own_trajectory(model, state: Tensor, sigma: Tensor, condition: Tensor) -> Tensor:
    """The sample (R, C, g, g) the model's sampler ends at from `state` (R, C, g, g) at noise level `sigma` (R,),
    one level for all rows, on the same grid and guidance: `own_trajectory_state` then this is the sampler's
    whole trajectory."""
    level = float(sigma[0])
    return sample_euler(model.dit, state, condition, model.config.flow, start_sigma=level)
