"""Rectified-flow (flow matching) objective and Euler sampler, as BLIP3-o trains and samples its DiT.

Maths only: the network is passed in as a callable ``velocity_fn(x_t, timestep, condition) -> v`` with
``v`` shaped like ``x_t``. Nothing here builds or imports a network.

Conventions (those of the official BLIP3-o code, see ``shared/fixtures/official_dit/flow_matching_official.md``):

- sigma is the noise level: sigma = 1 is pure noise, sigma = 0 is clean data.
- Path: ``x_t = (1 - sigma) x0 + sigma noise``; velocity target ``noise - x0``; the sampler integrates
  from sigma = 1 down to 0, so each Euler step moves by ``(sigma_next - sigma) v`` with a negative step.
- The network sees ``timestep = timestep_scale * sigma`` (1000 sigma, *not* 1 - sigma): float32 during
  training, ``int64 floor(1000 sigma)`` during sampling, exactly as the official code passes them.
- Training noise levels are the 1000 discrete levels of diffusers' ``FlowMatchEulerDiscreteScheduler``
  (N = 1000, shift s): ``sigma_i = s r / (1 + (s - 1) r)`` with ``r = (N - i) / N``. Both the training
  table and the sampling schedule are computed here directly, in the same float32 arithmetic as that
  scheduler; tests check bit-equality with it and with the fixture json.
- Classifier-free guidance: the condition of a whole sample is zeroed with probability ``cfg_dropout``
  during training; at sampling the unconditional branch uses ``zeros_like(condition)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class VelocityFn(Protocol):
    """The network interface: ``(x (B, ...), timestep (B,), condition (B, L, D) or None) -> (B, ...)``."""

    def __call__(self, x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor: ...


StepCallback = Callable[[int, Tensor], None]
# (clean-target estimate x0_hat (B, ...), noise level sigma) -> the estimate moved where it should be; called by
# the sampler at every step, it returns its input unchanged at levels where it does not act.
EstimateSteer = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Flow-matching hyper-parameters; the defaults are the official BLIP3-o values."""

    num_train_timesteps: int = 1000  # N: number of discrete training noise levels
    shift: float = 1.0  # scheduler timestep shift s (1.0 = identity, as released)
    cfg_dropout: float = 0.1  # probability of zeroing a sample's whole condition in training
    timestep_scale: float = 1000.0  # the network receives timestep_scale * sigma
    sample_steps: int = 30  # default Euler steps at sampling
    cfg_scale: float = 3.0  # default guidance weight w in v_u + w (v_c - v_u)
    # Guidance interval (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval"): the weight w
    # applies while cfg_sigma_min <= sigma <= cfg_sigma_max; elsewhere the guidance w - 1 is scaled by
    # cfg_outside (0: the conditional velocity alone). The defaults guide every step, as released.
    cfg_sigma_min: float = 0.0
    cfg_sigma_max: float = 1.0
    cfg_outside: float = 0.0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if not 0.0 <= self.cfg_sigma_min <= self.cfg_sigma_max <= 1.0:
            raise ValueError(
                "the guidance interval needs 0 <= cfg_sigma_min <= cfg_sigma_max <= 1, got "
                f"[{self.cfg_sigma_min}, {self.cfg_sigma_max}]"
            )
        if not 0.0 <= self.cfg_outside <= 1.0:
            raise ValueError(f"cfg_outside must be in [0, 1], got {self.cfg_outside}")

    def outside_weight(self, cfg_scale: float) -> float:
        """The guidance weight outside the interval: ``1 + cfg_outside (cfg_scale - 1)``."""
        return 1.0 + self.cfg_outside * (cfg_scale - 1.0)

    def guidance_interval(self) -> dict:
        """The guidance interval as a report writes it next to the sampler's other settings."""
        return {"cfg_sigma_range": [self.cfg_sigma_min, self.cfg_sigma_max], "cfg_outside": self.cfg_outside}


# ----------------------------------------------------------------------------------------------------------
# Schedules


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Timestep shift ``s sigma / (1 + (s - 1) sigma)`` in float32, the identity for s = 1."""
    sigmas = sigmas.to(torch.float32)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigmas(cfg: FlowMatchingConfig | None = None) -> Tensor:
    """The discrete training noise levels, (N,) float32, descending from 1.0 to (about) 1/N.

    Same float32 operations as ``FlowMatchEulerDiscreteScheduler.__init__``: integer levels N..1 divided
    by N, then shifted.
    """
    cfg = cfg or FlowMatchingConfig()
    n = cfg.num_train_timesteps
    levels = torch.arange(n, 0, -1, dtype=torch.float32)  # (N,) N, N-1, ..., 1
    return shift_sigmas(levels / n, cfg.shift)


def training_timesteps(cfg: FlowMatchingConfig | None = None) -> Tensor:
    """The network timesteps paired with ``training_sigmas``, (N,) float32 ``timestep_scale * sigma``.

    With shift 1 a few of these are not integers (float32 rounding of ``(i / N) * N``); the official
    code feeds exactly these floats, so they are kept as they are.
    """
    cfg = cfg or FlowMatchingConfig()
    return training_sigmas(cfg) * cfg.timestep_scale


class SamplingSchedule(NamedTuple):
    sigmas: Tensor  # (steps + 1,) float32, 1.0 ... 1/steps (shifted), then a terminal 0.0
    timesteps: Tensor  # (steps,) float32 timestep_scale * sigma_k (what diffusers calls .timesteps)
    network_timesteps: Tensor  # (steps,) int64 floor(timesteps): what the official sampler feeds the DiT


def sampling_schedule(steps: int | None = None, cfg: FlowMatchingConfig | None = None) -> SamplingSchedule:
    """The official Euler schedule: sigmas = linspace(1, 1/steps, steps) (shifted) then 0 appended.

    Equal to ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps, sigmas=np.linspace(1, 1/steps, steps))``:
    the linspace is taken in float64 and rounded to float32 as diffusers does with the numpy array.
    """
    cfg = cfg or FlowMatchingConfig()
    steps = cfg.sample_steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    linear = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).to(torch.float32)  # (steps,)
    sigmas = shift_sigmas(linear, cfg.shift)  # (steps,)
    timesteps = sigmas * cfg.timestep_scale  # (steps,) float32
    # .long() truncates toward zero, i.e. floor for these non-negative values, as the official cast does.
    network_timesteps = timesteps.long()  # (steps,) int64
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # (steps + 1,)
    return SamplingSchedule(sigmas=sigmas, timesteps=timesteps, network_timesteps=network_timesteps)


# ----------------------------------------------------------------------------------------------------------
# Random draws


def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def initial_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape``, drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's own device (CPU for a default ``torch.Generator()``) makes a seed give
    the same noise whatever device the model runs on.
    """
    target = torch.device(device) if device is not None else _generator_device(generator, torch.device("cpu"))
    draw_device = _generator_device(generator, target)
    noise = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32)
    return noise.to(device=target, dtype=dtype)


class NoiseLevel(NamedTuple):
    index: Tensor  # (B,) int64 index into the training table
    sigma: Tensor  # (B,) float32 noise level
    timestep: Tensor  # (B,) float32 network timestep, timestep_scale * sigma


def noise_level_from_uniform(u: Tensor, cfg: FlowMatchingConfig | None = None) -> NoiseLevel:
    """Map u in [0, 1) to a training level as the official code does: i = floor(N u), table lookup."""
    cfg = cfg or FlowMatchingConfig()
    n = cfg.num_train_timesteps
    # float32 N*u never reaches N for u < 1 at N = 1000; the clamp only guards other N and dtypes.
    index = (u.to(torch.float32) * n).long().clamp_(0, n - 1)  # (B,)
    sigmas = training_sigmas(cfg).to(u.device)
    timesteps = training_timesteps(cfg).to(u.device)
    return NoiseLevel(index=index, sigma=sigmas[index], timestep=timesteps[index])


def sample_training_sigma(
    batch: int, generator: torch.Generator | None = None, cfg: FlowMatchingConfig | None = None
) -> NoiseLevel:
    """Draw ``batch`` training noise levels uniformly over the N discrete levels (u ~ U[0,1), i = floor(N u)).

    No logit-normal sampling and no loss weighting, as in the official training. The draw happens on
    the generator's device (CPU by default), like the official ``torch.rand`` on CPU.
    """
    u = torch.rand(batch, generator=generator, device=_generator_device(generator, torch.device("cpu")))
    return noise_level_from_uniform(u, cfg)


def drop_condition(
    condition: Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Zero whole rows (samples) of ``condition`` with probability ``p`` each, for classifier-free guidance.

    Returns ``(condition with dropped rows zeroed, mask (B,) bool, True = dropped)``. The mask is drawn on
    the generator's device; ``torch.where`` (not a multiply) makes dropped rows exactly zero.
    """
    batch = condition.shape[0]
    u = torch.rand(batch, generator=generator, device=_generator_device(generator, condition.device))
    mask = (u < p).to(condition.device)  # (B,)
    row_mask = mask.view(batch, *([1] * (condition.dim() - 1)))  # (B, 1, ..., 1)
    return torch.where(row_mask, torch.zeros_like(condition), condition), mask


# ----------------------------------------------------------------------------------------------------------
# Training objective


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise``; sigma (B,) broadcasts over the trailing dimensions."""
    sigma = sigma.to(device=x0.device, dtype=x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ..., 1)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity ``d x_t / d sigma = noise - x0``."""
    return noise - x0


@dataclass
class FlowMatchingDraws:
    """Every random quantity of one loss evaluation; pass one to replay a recorded evaluation exactly."""

    index: Tensor  # (B,) int64 training level index
    noise: Tensor  # like x0, standard normal
    drop_mask: Tensor | None  # (B,) bool, True = condition zeroed; None = no dropout applied


def draw_flow_matching(
    x0: Tensor,
    condition: Tensor | None,
    generator: torch.Generator | None = None,
    cfg: FlowMatchingConfig | None = None,
) -> FlowMatchingDraws:
    """Draw, in this fixed order from one generator: the levels u (B,), the noise (like x0), the dropout mask.

    The order is part of the reproducibility contract: a seed fixes all three.
    """
    cfg = cfg or FlowMatchingConfig()
    level = sample_training_sigma(x0.shape[0], generator, cfg)
    noise = initial_noise(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    drop_mask = None
    if condition is not None and cfg.cfg_dropout > 0:
        _, drop_mask = drop_condition(condition, cfg.cfg_dropout, generator)
    return FlowMatchingDraws(index=level.index.to(x0.device), noise=noise, drop_mask=drop_mask)


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x0: Tensor,
    condition: Tensor | None,
    generator: torch.Generator | None = None,
    cfg: FlowMatchingConfig | None = None,
    draws: FlowMatchingDraws | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One flow-matching loss evaluation: ``mean((velocity_fn(x_t, 1000 sigma, c) - (noise - x0))^2)``.

    The mean is over every element, in float32 whatever the network's dtype. ``draws`` replaces the
    random draws (for replaying a recorded evaluation); otherwise they come from ``generator``.

    Returns ``(loss, aux)``; aux holds detached intermediates for tests and logging: ``sigma``,
    ``timestep``, ``index``, ``noise``, ``x_t``, ``target``, ``prediction``, ``drop_mask`` (if any) and
    ``loss_per_sample`` (B,), which lets training logs bin the loss by noise level.
    """
    cfg = cfg or FlowMatchingConfig()
    if draws is None:
        draws = draw_flow_matching(x0, condition, generator, cfg)
    index = draws.index.to(x0.device)
    sigma = training_sigmas(cfg).to(x0.device)[index]  # (B,) float32
    timestep = training_timesteps(cfg).to(x0.device)[index]  # (B,) float32, timestep_scale * sigma
    noise = draws.noise.to(device=x0.device, dtype=x0.dtype)  # like x0

    x_t = interpolate(x0, noise, sigma)  # like x0
    target = velocity_target(x0, noise)  # like x0
    if condition is not None and draws.drop_mask is not None:
        row_mask = draws.drop_mask.to(device=condition.device, dtype=torch.bool)
        row_mask = row_mask.view(-1, *([1] * (condition.dim() - 1)))  # (B, 1, ..., 1)
        condition = torch.where(row_mask, torch.zeros_like(condition), condition)

    prediction = velocity_fn(x_t, timestep, condition)  # like x0
    if prediction.shape != x0.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(prediction.shape)}, expected {tuple(x0.shape)}")
    squared_error = (prediction.float() - target.float()).pow(2)  # like x0, float32
    loss = squared_error.mean()
    aux = {
        "index": index,
        "sigma": sigma,
        "timestep": timestep,
        "noise": noise.detach(),
        "x_t": x_t.detach(),
        "target": target.detach(),
        "prediction": prediction.detach(),
        "loss_per_sample": squared_error.detach().flatten(1).mean(dim=1),  # (B,)
    }
    if draws.drop_mask is not None:
        aux["drop_mask"] = draws.drop_mask
    return loss, aux


# ----------------------------------------------------------------------------------------------------------
# Sampler


def guided_velocity(
    velocity_fn: VelocityFn, x: Tensor, timestep: Tensor, condition: Tensor | None, cfg_scale: float
) -> Tensor:
    """The (guided) velocity at one step.

    With guidance, both branches go through ONE network call on the batch ``[x; x]`` with conditions
    ``[zeros_like(c); c]`` (unconditional first, as officially), then ``v = v_u + w (v_c - v_u)``.
    With ``cfg_scale == 1`` or no condition the unconditional branch is skipped: it would cancel out.
    """
    if condition is None or cfg_scale == 1.0:
        return velocity_fn(x, timestep, condition)
    batch = x.shape[0]
    both_x = torch.cat([x, x])  # (2B, ...)
    both_t = torch.cat([timestep, timestep])  # (2B,)
    both_c = torch.cat([torch.zeros_like(condition), condition])  # (2B, L, D)
    v_uncond, v_cond = velocity_fn(both_x, both_t, both_c).split(batch)  # (B, ...) each
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def steered_velocity(x: Tensor, velocity: Tensor, sigma: float, steer: EstimateSteer) -> Tensor:
    """The velocity whose clean-target estimate is ``steer``'s: ``v' = (x - steer(x - sigma v)) / sigma``.

    A flow state is ``x = (1 - sigma) x0 + sigma noise``, so the velocity ``noise - x0`` implies the estimate
    ``x0_hat = x - sigma v``; moving the estimate and taking the velocity that implies the moved one steers the
    next Euler step without changing the network (guidance on the clean estimate, as in universal guidance,
    Bansal et al. 2023). At sigma = 0 there is no velocity to steer. Unchanged estimate, unchanged velocity."""
    if sigma <= 0.0:
        return velocity
    estimate = x - sigma * velocity  # (B, ...)
    return (x - steer(estimate, sigma)) / sigma


def guidance_weight(sigma: float, cfg_scale: float, cfg: FlowMatchingConfig) -> float:
    """The guidance weight at noise level ``sigma``: ``cfg_scale`` inside the config's guidance interval,
    ``1 + cfg_outside (cfg_scale - 1)`` outside it.

    Why an interval: guidance at high noise, where the sample's layout is still undecided, pushes every
    location towards the condition; for an object-centric target that draws extra objects. On the bundled
    model (bench/token_category.py --pixels, session 34) guidance 3 in [0, 0.7] and 2 above lifts counting
    (0.397 -> 0.473 in pixels, 300 samples) but loses position (0.573 -> 0.495) and two objects (0.670 ->
    0.630): the layout it decides at high noise is also where objects are placed, so the bundle guides every
    step."""
    if cfg.cfg_sigma_min <= sigma <= cfg.cfg_sigma_max:
        return cfg_scale
    return cfg.outside_weight(cfg_scale)


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn,
    noise: Tensor,
    condition: Tensor | None,
    cfg: FlowMatchingConfig | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
    start_sigma: float = 1.0,
    end_step: int | None = None,
    steer: EstimateSteer | None = None,
) -> Tensor:
    """Integrate the flow from ``noise`` (sigma = 1) to a sample ``x0_hat`` (sigma = 0) with Euler steps.

    Follows the official ``sample_images``: ``sampling_schedule(steps)``, the network sees int64
    ``floor(1000 sigma_k)``, CFG as in ``guided_velocity``, and ``x <- x + (sigma_{k+1} - sigma_k) v``; the
    weight at step k is ``guidance_weight(sigma_k, cfg_scale, cfg)`` (``cfg_scale`` at every step by default).
    The state is kept in float32 (the scheduler upcasts too); the network gets it as is, so a bf16
    network should be wrapped (autocast or a casting closure). Deterministic given ``noise``; draw it with
    ``initial_noise(shape, generator)``. ``callback(k, x)`` is called after step k with the new state.

    ``start_sigma`` < 1 starts part-way (SDEdit-style): ``noise`` is then the state at that level, e.g.
    ``interpolate(x0, noise, sigma)``, and the trajectory runs through the same grid's levels below it.
    ``end_step`` k stops after k steps, returning the state at the trajectory's level k (``sigmas[k]`` of the
    grid it runs through): the model's own state part-way, for losses taken on its trajectory.
    ``steer`` moves each step's clean-target estimate (``steered_velocity``), e.g. count guidance.
    """
    if not 0.0 < start_sigma <= 1.0:
        raise ValueError(f"start_sigma must be in (0, 1], got {start_sigma}")
    cfg = cfg or FlowMatchingConfig()
    cfg_scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    schedule = sampling_schedule(steps, cfg)
    sigmas = schedule.sigmas.to(noise.device)  # (steps + 1,)
    network_timesteps = schedule.network_timesteps.to(noise.device)  # (steps,)
    if start_sigma < 1.0:
        below = sigmas[sigmas < start_sigma]  # (k,) the grid's levels under the start, ending with 0
        sigmas = torch.cat([sigmas.new_tensor([start_sigma]), below])  # (k + 1,)
        network_timesteps = (sigmas[:-1] * cfg.timestep_scale).long()  # (k,) as sampling_schedule casts
    x = noise.to(torch.float32)  # (B, ...)
    batch = x.shape[0]
    # Each step's guidance weight, read off the grid once (no device sync inside the loop).
    levels = sigmas[:-1].tolist()
    weights = [guidance_weight(sigma, cfg_scale, cfg) for sigma in levels]

    n_steps = len(network_timesteps)
    if end_step is not None and not 0 <= end_step <= n_steps:
        raise ValueError(f"end_step must be in [0, {n_steps}], got {end_step}")
    step_indices = range(n_steps if end_step is None else end_step)
    if progress:
        from tqdm.auto import tqdm

        step_indices = tqdm(step_indices, desc="euler", leave=False)
    for k in step_indices:
        timestep = network_timesteps[k].expand(batch)  # (B,) int64
        velocity = guided_velocity(velocity_fn, x, timestep, condition, weights[k])  # (B, ...)
        if steer is not None:
            velocity = steered_velocity(x, velocity.to(torch.float32), levels[k], steer)  # (B, ...)
        # The step is negative (sigma decreases); the difference is taken in float32 like the scheduler.
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity.to(torch.float32)
        if callback is not None:
            callback(k, x)
    return x


__all__ = [
    "FlowMatchingConfig",
    "FlowMatchingDraws",
    "NoiseLevel",
    "SamplingSchedule",
    "StepCallback",
    "VelocityFn",
    "draw_flow_matching",
    "drop_condition",
    "flow_matching_loss",
    "guidance_weight",
    "guided_velocity",
    "initial_noise",
    "interpolate",
    "noise_level_from_uniform",
    "sample_euler",
    "sample_training_sigma",
    "sampling_schedule",
    "shift_sigmas",
    "training_sigmas",
    "training_timesteps",
    "velocity_target",
]
