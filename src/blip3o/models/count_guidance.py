"""Count guidance: each sampling step's clean-target estimate is moved towards holding as many objects of each
shape as the prompt names, as the model's own CLIP label head reads them.

Why: on the object-centric target the DiT's counting failures sit in its tokens (bench/token_category.py: the
bundled model's tokens hold the asked count in 0.675 of 600 counting samples), and no sampler setting moved
that (guidance scale, interval, shift, steps, a stochastic sampler; docs/bench/object_target.txt). The label
head reads the count of each shape in any estimate differentiably (the `count` stages train the DiT through the
same reading, train/count_supervision.py); here it steers sampling instead: at every step with noise level
sigma >= `sigma_min`, `GRADIENT_STEPS` steps on the estimate x0_hat = x - sigma v, each of length `strength`
(in the target's units; a whole estimate has norm ~40 on the bundled model) times the row's count error
(capped at 1), along the gradient of sum over shapes |expected count - named count|; the sampler then takes
the velocity that implies the moved estimate (`transport.steered_velocity`).

The expected counts saturate (a confident token's shape probability has almost no gradient), so the gradient
is normalised per row: its direction steers, the error decides how far. A row whose estimate already holds the
named counts (error 0) is not moved, nor one whose prompt names no "<number> [colour] <shape>" phrase.

What it knows of the prompt: the shapes and numbers its noun phrases name (world.language.noun_phrases), as
the self-check does; not colours, not positions. It reads the model's own CLIP, never the judge.

Measured on the bundled model (session 71; `bench/token_category.py src/blip3o/bundled/model --category counting
--seeds 40 --pixels [--count-guidance 10]`, 600 samples, the same seeds): counting in the tokens 0.675 -> 0.905,
in pixels 0.648 -> 0.727 (81 samples fail -> pass, 34 pass -> fail; paired SE 0.018). The pixels keep less of
the gain than the tokens: the decoder still draws four crowded objects as three (too few in 62 of 200 "four"
samples, 70 unguided), and draws objects the guided tokens do not hold (too many in 28 of 200 "three" samples
against 3 in their tokens).
Costs two label-head passes with their gradients per guided step (the DiT is not differentiated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip3o.models.clip import grid_to_tokens
from blip3o.world.language import noun_phrases
from blip3o.world.scene import SHAPES

if TYPE_CHECKING:
    from blip3o.models.clip import ClipEncoder
    from blip3o.transport import EstimateSteer

GRADIENT_STEPS = 2  # per noise level (session 71's probe used 2)
DEFAULT_SIGMA_MIN = 0.3  # steer while sigma >= this: where the layout, and with it the count, is decided


def prompt_shape_counts(prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(B, S) objects of each shape (SHAPES order) the prompts name, and (B,) bool: whether a prompt names any.

    "a photo of three stars" -> star 3, the others 0; "a photo of a red circle and a blue star" -> circle 1,
    star 1; a prompt without a "<number> [colour] <shape>" phrase -> zeros, not known."""
    counts = torch.zeros(len(prompts), len(SHAPES))  # (B, S)
    known = torch.zeros(len(prompts), dtype=torch.bool)  # (B,)
    for row, prompt in enumerate(prompts):
        for n, _, shape in noun_phrases(prompt):
            counts[row, SHAPES.index(shape)] += n
            known[row] = True
    return counts, known


def shape_count_error(readings: Tensor, counts: Tensor, known: Tensor) -> Tensor:
    """(B,) sum over shapes of |expected count - named count| (0 for rows not known).

    readings (B, N, L): the label head's reading, shapes first in SHAPES order (their probabilities per token);
    counts (B, S); known (B,) bool."""
    expected = readings[..., : len(SHAPES)].sum(dim=1)  # (B, S)
    return (expected - counts.to(expected)).abs().sum(dim=-1) * known.to(expected)  # (B,)


def count_steer(
    read_labels, counts: Tensor, known: Tensor, strength: float, sigma_min: float = DEFAULT_SIGMA_MIN
) -> EstimateSteer:
    """An `EstimateSteer` (estimate (B, C, g, g), sigma) -> moved estimate, as the module docstring says.

    read_labels: differentiable (B, C, g, g) estimate -> (B, N, L) label-head reading; counts (B, S) and known
    (B,) from `prompt_shape_counts`; strength >= 0 (0: off)."""
    if strength < 0:
        raise ValueError(f"count guidance strength must be >= 0, got {strength}")
    if not 0.0 <= sigma_min <= 1.0:
        raise ValueError(f"count guidance sigma_min must be in [0, 1], got {sigma_min}")

    def steer(estimate: Tensor, sigma: float) -> Tensor:
        if strength == 0 or sigma < sigma_min or not bool(known.any()):
            return estimate
        moved = estimate.detach().float()  # (B, C, g, g)
        for _ in range(GRADIENT_STEPS):
            with torch.enable_grad():  # the sampler runs under no_grad
                moved.requires_grad_(True)
                error = shape_count_error(read_labels(moved), counts.to(moved.device), known.to(moved.device))
                (gradient,) = torch.autograd.grad(error.sum(), moved)  # rows do not mix: per-row gradients
            norm = gradient.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            reach = strength * error.detach().clamp(max=1.0).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            moved = (moved - reach * gradient / norm).detach()
        return moved.to(estimate.dtype)

    return steer


def check_count_reader(clip: ClipEncoder) -> None:
    """ValueError unless `clip` has the object label head count guidance reads with."""
    if not clip.config.patch_label_weight or clip.config.patch_label_kind != "object":
        raise ValueError(
            "count guidance reads objects with CLIP's object label head; this model has none "
            "(ClipConfig.patch_label_kind 'object' with patch_label_weight > 0)"
        )


def clip_count_steer(
    clip: ClipEncoder, prompts: list[str], strength: float, sigma_min: float = DEFAULT_SIGMA_MIN
) -> EstimateSteer:
    """`count_steer` reading estimates with `clip`'s label head; ValueError when it has no object label head."""
    check_count_reader(clip)
    counts, known = prompt_shape_counts(prompts)
    return count_steer(
        lambda estimate: clip.patch_labels_from_target(grid_to_tokens(estimate)),
        counts,
        known,
        strength,
        sigma_min,
    )
