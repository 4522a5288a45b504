"""Transport: the generation objectives and their samplers. Maths only, no networks.

The network is always a callable ``fn(x, timestep, condition) -> tensor shaped like x`` (the DiT's
forward), so the two objectives of the paper's design study share one network interface:

- ``"flow_matching"``: BLIP3-o's rectified flow (``flow_matching.py``); ``fn`` predicts a velocity.
- ``"mse"``: the CLIP + MSE regression baseline (``regression.py``); ``fn`` predicts x0 from the condition.

Training and evaluation code pick one with ``build_objective(name, cfg)`` and then call ``.loss`` and
``.sample`` without knowing which it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from blip3o.transport.flow_matching import (
    EstimateSteer,
    FlowMatchingConfig,
    FlowMatchingDraws,
    NoiseLevel,
    SamplingSchedule,
    StepCallback,
    VelocityFn,
    draw_flow_matching,
    drop_condition,
    flow_matching_loss,
    guidance_weight,
    guided_velocity,
    initial_noise,
    interpolate,
    noise_level_from_uniform,
    sample_euler,
    sample_training_sigma,
    sampling_schedule,
    shift_sigmas,
    steered_velocity,
    training_sigmas,
    training_timesteps,
    velocity_target,
)
from blip3o.transport.regression import (
    REGRESSION_TIMESTEP,
    regression_inputs,
    regression_loss,
    sample_regression,
)

ObjectiveName = Literal["flow_matching", "mse"]
OBJECTIVE_NAMES: tuple[ObjectiveName, ...] = ("flow_matching", "mse")


class Objective(Protocol):
    """What training and evaluation need from a generation objective."""

    name: ObjectiveName
    cfg: FlowMatchingConfig

    def loss(
        self, fn: VelocityFn, x0: Tensor, condition: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar float32 loss and a dict of detached intermediates for logging."""
        ...

    def sample(
        self,
        fn: VelocityFn,
        noise: Tensor,
        condition: Tensor | None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        steer: EstimateSteer | None = None,
    ) -> Tensor:
        """x0_hat (float32) shaped like ``noise``. ``noise`` is the starting point (see each objective);
        ``steer`` moves each step's clean-target estimate (flow matching only)."""
        ...


@dataclass(frozen=True)
class FlowMatchingObjective:
    """BLIP3-o's objective: rectified-flow velocity MSE with CFG dropout; Euler + CFG sampling."""

    cfg: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    name: ObjectiveName = "flow_matching"

    def loss(
        self, fn: VelocityFn, x0: Tensor, condition: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return flow_matching_loss(fn, x0, condition, generator, self.cfg)

    def sample(
        self,
        fn: VelocityFn,
        noise: Tensor,
        condition: Tensor | None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        steer: EstimateSteer | None = None,
    ) -> Tensor:
        return sample_euler(fn, noise, condition, self.cfg, steps, cfg_scale, progress, callback, steer=steer)


@dataclass(frozen=True)
class RegressionObjective:
    """The CLIP + MSE baseline. ``sample`` uses ``noise`` only for its shape, dtype and device.

    Taking (and ignoring) the noise keeps the calling code identical for both objectives, and makes the
    baseline's determinism visible: different noise, same output. ``steps``, ``cfg_scale`` and
    ``progress`` are accepted for the same reason and ignored (one call, no guidance).
    """

    cfg: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    name: ObjectiveName = "mse"

    def loss(
        self, fn: VelocityFn, x0: Tensor, condition: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # No random draws: the generator is accepted for interface symmetry only.
        loss = regression_loss(fn, x0, condition)
        return loss, {}

    def sample(
        self,
        fn: VelocityFn,
        noise: Tensor,
        condition: Tensor | None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        steer: EstimateSteer | None = None,
    ) -> Tensor:
        if steer is not None:  # one call, no trajectory: nothing to steer
            raise ValueError("the regression objective has no sampling trajectory to steer")
        x0_hat = sample_regression(fn, condition, noise.shape, device=noise.device, dtype=noise.dtype)
        if callback is not None:
            callback(0, x0_hat)
        return x0_hat


def build_objective(name: ObjectiveName, cfg: FlowMatchingConfig | None = None) -> Objective:
    """The objective named in the training config: ``"flow_matching"`` (BLIP3-o) or ``"mse"`` (baseline).

    ``cfg`` carries the flow-matching settings; the regression objective keeps it only so that a config
    round-trips, it uses none of it.
    """
    cfg = cfg or FlowMatchingConfig()
    if name == "flow_matching":
        return FlowMatchingObjective(cfg)
    if name == "mse":
        return RegressionObjective(cfg)
    raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVE_NAMES}")


__all__ = [
    "OBJECTIVE_NAMES",
    "REGRESSION_TIMESTEP",
    "EstimateSteer",
    "FlowMatchingConfig",
    "FlowMatchingDraws",
    "FlowMatchingObjective",
    "NoiseLevel",
    "Objective",
    "ObjectiveName",
    "RegressionObjective",
    "SamplingSchedule",
    "StepCallback",
    "VelocityFn",
    "build_objective",
    "draw_flow_matching",
    "drop_condition",
    "flow_matching_loss",
    "guidance_weight",
    "guided_velocity",
    "initial_noise",
    "interpolate",
    "noise_level_from_uniform",
    "regression_inputs",
    "regression_loss",
    "sample_euler",
    "sample_regression",
    "sample_training_sigma",
    "sampling_schedule",
    "shift_sigmas",
    "steered_velocity",
    "training_sigmas",
    "training_timesteps",
    "velocity_target",
]
