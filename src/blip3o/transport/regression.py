"""The paper's "CLIP + MSE" baseline: regress the clean target directly from the condition.

This is the Emu2 / MetaMorph style design that BLIP3-o compares flow matching against: the network maps
the condition straight to the CLIP feature tokens and is trained with a plain MSE, so sampling is one
deterministic call (no noise, no steps, no guidance), and the same prompt always gives the same features.

How the network is called. To reuse the DiT (and any other ``velocity_fn``) unchanged, regression uses
the same interface ``fn(x, timestep, condition)`` with a fixed, information-free input:

- ``x = zeros`` shaped like the target (the network has no noisy sample to look at),
- ``timestep = 0`` (float32, one per sample),

and reads the output as the prediction of ``x0`` itself, not as a velocity. All information therefore
comes from the condition, which is the point of the baseline. A zero grid embeds to the same vector
(the patch-embedding bias) at every token; the DiT's 2D RoPE in attention still tells the tokens apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blip3o.transport.flow_matching import VelocityFn

# The fixed timestep the network sees in regression mode. 0 is "clean" in the flow-matching convention
# (timestep = 1000 sigma), which matches what the output means: the clean target.
REGRESSION_TIMESTEP = 0.0


def regression_inputs(
    shape: tuple[int, ...] | torch.Size, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """The fixed network inputs of regression mode: ``(x zeros (B, ...), timestep zeros (B,) float32)``."""
    x = torch.zeros(tuple(shape), device=device, dtype=dtype)  # (B, ...)
    timestep = torch.full((shape[0],), REGRESSION_TIMESTEP, device=device, dtype=torch.float32)  # (B,)
    return x, timestep


def regression_loss(predict_fn: VelocityFn, x0: Tensor, condition: Tensor | None) -> Tensor:
    """``mean((predict_fn(0, 0, c) - x0)^2)`` over every element, in float32."""
    x, timestep = regression_inputs(x0.shape, x0.device, x0.dtype)
    prediction = predict_fn(x, timestep, condition)  # like x0
    if prediction.shape != x0.shape:
        raise ValueError(f"predict_fn returned shape {tuple(prediction.shape)}, expected {tuple(x0.shape)}")
    return (prediction.float() - x0.float()).pow(2).mean()


@torch.no_grad()
def sample_regression(
    predict_fn: VelocityFn,
    condition: Tensor | None,
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The regression "sample": one network call on the fixed inputs, returned in float32.

    ``shape`` is the target's shape (B, ...); the zero input needs it because the condition alone does
    not say how many feature tokens to produce. ``device`` defaults to the condition's.
    """
    if device is None:
        device = condition.device if condition is not None else torch.device("cpu")
    x, timestep = regression_inputs(shape, device, dtype)
    return predict_fn(x, timestep, condition).to(torch.float32)  # (B, ...)


__all__ = ["REGRESSION_TIMESTEP", "regression_inputs", "regression_loss", "sample_regression"]
