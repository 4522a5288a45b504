"""Tests for blip3o.transport: flow matching, its schedules and sampler, the MSE baseline, the objective switch.

No test here builds a neural network of its own: the "networks" are hand-written velocity fields whose
answers can be worked out on paper. The fixture-replay tests use the project's DiT when it is importable
and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from blip3o.transport import (
    FlowMatchingConfig,
    FlowMatchingDraws,
    FlowMatchingObjective,
    RegressionObjective,
    build_objective,
    drop_condition,
    flow_matching_loss,
    guidance_weight,
    initial_noise,
    interpolate,
    noise_level_from_uniform,
    regression_loss,
    sample_euler,
    sample_regression,
    sample_training_sigma,
    sampling_schedule,
    training_sigmas,
    training_timesteps,
    velocity_target,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SUBDIR = Path("fixtures") / "official_dit"


def _fixture_dir() -> Path | None:
    """The official-DiT fixtures: $BLIP3O_FIXTURES, else the copy in tests/, else shared/ next to the checkout."""
    candidates = [REPO_ROOT / "tests" / FIXTURE_SUBDIR, REPO_ROOT.parent / "shared" / FIXTURE_SUBDIR]
    if "BLIP3O_FIXTURES" in os.environ:
        candidates.insert(0, Path(os.environ["BLIP3O_FIXTURES"]) / "official_dit")
    return next((path for path in candidates if path.is_dir()), None)


FIXTURES = _fixture_dir()
needs_fixtures = pytest.mark.skipif(
    FIXTURES is None, reason="official DiT fixtures (shared/fixtures) not found"
)


@pytest.fixture(scope="module")
def schedule_json() -> dict:
    assert FIXTURES is not None
    return json.loads((FIXTURES / "flow_matching_schedule.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# Schedules


@needs_fixtures
def test_training_table_matches_fixture_json(schedule_json: dict) -> None:
    expected_sigmas = torch.tensor(schedule_json["training"]["sigmas"], dtype=torch.float32)
    expected_timesteps = torch.tensor(schedule_json["training"]["timesteps"], dtype=torch.float32)
    sigmas, timesteps = training_sigmas(), training_timesteps()
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert torch.equal(sigmas, expected_sigmas)
    assert torch.equal(timesteps, expected_timesteps)
    # The float32 round trip (i / N) * N leaves a few non-integer timesteps; they must be kept as is.
    non_integer = int((timesteps != timesteps.round()).sum())
    assert non_integer == schedule_json["training"]["num_non_integer_timesteps"] == 10


@needs_fixtures
def test_sampling_schedule_matches_fixture_json(schedule_json: dict) -> None:
    recorded = schedule_json["sampling_30_steps"]
    schedule = sampling_schedule(30)
    assert torch.equal(
        schedule.sigmas, torch.tensor(recorded["sigmas_with_terminal_zero"], dtype=torch.float32)
    )
    assert torch.equal(schedule.timesteps, torch.tensor(recorded["timesteps_float32"], dtype=torch.float32))
    assert schedule.network_timesteps.dtype == torch.int64
    assert schedule.network_timesteps.tolist() == recorded["timesteps_fed_to_dit_long"]
    # The documented list from the official sampler, spelled out.
    assert schedule.network_timesteps.tolist()[:6] == [1000, 966, 933, 900, 866, 833]
    assert schedule.network_timesteps.tolist()[-3:] == [100, 66, 33]
    # The default step count is the official 30.
    assert torch.equal(sampling_schedule().sigmas, schedule.sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedules_equal_diffusers_scheduler(shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = FlowMatchingConfig(shift=shift)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert torch.equal(training_sigmas(cfg), scheduler.sigmas)
    assert torch.equal(training_timesteps(cfg), scheduler.timesteps)
    for steps in (1, 2, 7, 30, 50, 100, 250):
        # Exactly the official call: sigmas=np.linspace(1.0, 1 / steps, steps).
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
        schedule = sampling_schedule(steps, cfg)
        assert torch.equal(schedule.sigmas, scheduler.sigmas), steps
        assert torch.equal(schedule.timesteps, scheduler.timesteps), steps
        assert torch.equal(schedule.network_timesteps, scheduler.timesteps.long()), steps


def test_schedule_shape_and_endpoints() -> None:
    schedule = sampling_schedule(4)
    assert schedule.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert schedule.network_timesteps.tolist() == [1000, 750, 500, 250]
    sigmas = training_sigmas()
    assert sigmas.shape == (1000,)
    assert sigmas[0] == 1.0 and sigmas[-1] == pytest.approx(0.001)
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    # Shift > 1 pushes mass toward high noise: every interior level moves up, the end points stay.
    shifted = training_sigmas(FlowMatchingConfig(shift=3.0))
    assert shifted[0] == 1.0 and bool((shifted[1:] > sigmas[1:]).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_train_timesteps": 0},
        {"shift": 0.0},
        {"cfg_dropout": 1.5},
        {"sample_steps": 0},
        {"cfg_sigma_min": 0.6, "cfg_sigma_max": 0.4},
        {"cfg_sigma_max": 1.5},
        {"cfg_sigma_min": -0.1},
        {"cfg_outside": 1.5},
    ],
)
def test_config_rejects_invalid_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FlowMatchingConfig(**kwargs)


def test_config_defaults_are_official() -> None:
    cfg = FlowMatchingConfig()
    assert (cfg.num_train_timesteps, cfg.shift, cfg.cfg_dropout) == (1000, 1.0, 0.1)
    assert (cfg.timestep_scale, cfg.sample_steps, cfg.cfg_scale) == (1000.0, 30, 3.0)


# ----------------------------------------------------------------------------------------------------------
# Training-level sampling and CFG dropout


def test_training_levels_follow_floor_n_u() -> None:
    u = torch.tensor([0.0, 0.0009999, 0.001, 0.5, 0.6168846487998962, 0.9999999])
    level = noise_level_from_uniform(u)
    assert level.index.tolist() == [0, 0, 1, 500, 616, 999]
    # Index 0 is the noisiest level (sigma 1, timestep 1000), index 999 the cleanest (sigma 1/1000).
    assert level.sigma[0] == 1.0 and level.timestep[0] == 1000.0
    assert level.sigma[-1] == pytest.approx(0.001) and level.timestep[-1] == pytest.approx(1.0)
    assert level.sigma[4] == pytest.approx(0.384) and level.timestep[4] == 384.0


def test_training_levels_are_uniform_over_the_table() -> None:
    from scipy.stats import chisquare

    draws = 200_000
    level = sample_training_sigma(draws, torch.Generator().manual_seed(0))
    counts = torch.bincount(level.index, minlength=1000)
    assert counts.shape == (1000,) and int(counts.min()) > 0  # every level is reachable
    # A chi-square test of uniformity over the 1000 levels (expected 200 each); a biased sampler fails it.
    assert chisquare(counts.numpy()).pvalue > 1e-4
    assert torch.equal(level.sigma, training_sigmas()[level.index])


def test_drop_condition_zeroes_whole_rows_at_the_requested_rate() -> None:
    generator = torch.Generator().manual_seed(1)
    condition = torch.randn(20_000, 3, 4, generator=generator) + 5.0  # no accidental zeros
    dropped, mask = drop_condition(condition, 0.1, generator)
    assert mask.dtype == torch.bool and mask.shape == (20_000,)
    assert bool((dropped[mask] == 0).all())  # dropped rows: entirely zero
    assert torch.equal(dropped[~mask], condition[~mask])  # kept rows: untouched
    # Binomial(20000, 0.1): mean 2000, std ~42.4. Five standard deviations either side.
    rate = mask.float().mean().item()
    assert abs(rate - 0.1) < 5 * (0.1 * 0.9 / 20_000) ** 0.5
    assert not drop_condition(condition, 0.0, generator)[1].any()
    assert drop_condition(condition, 1.0, generator)[1].all()


def test_drop_condition_keeps_gradients_for_kept_rows() -> None:
    condition = torch.ones(4, 2, 3, requires_grad=True)
    dropped, mask = drop_condition(condition, 0.5, torch.Generator().manual_seed(3))
    dropped.sum().backward()
    assert condition.grad is not None
    expected = (~mask).float().view(4, 1, 1).expand(4, 2, 3)
    assert torch.equal(condition.grad, expected)


# ----------------------------------------------------------------------------------------------------------
# Loss


def test_interpolate_and_target_by_hand() -> None:
    x0 = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    noise = torch.tensor([[3.0, -1.0], [0.0, 4.0]])
    sigma = torch.tensor([0.5, 0.25])
    # Row 0: 0.5*1 + 0.5*3 = 2, 0.5*1 + 0.5*(-1) = 0. Row 1: 0.75*2 + 0.25*0 = 1.5, 0.75*0 + 0.25*4 = 1.
    assert interpolate(x0, noise, sigma).tolist() == [[2.0, 0.0], [1.5, 1.0]]
    assert velocity_target(x0, noise).tolist() == [[2.0, -2.0], [-2.0, 4.0]]
    # The path's end points: sigma = 0 is data, sigma = 1 is noise.
    assert torch.equal(interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(2)), noise)


def test_loss_hand_value_and_network_inputs() -> None:
    cfg = FlowMatchingConfig(cfg_dropout=0.0)
    x0 = torch.tensor([[[[1.0, 1.0]]]])  # (1, 1, 1, 2)
    draws = FlowMatchingDraws(
        index=torch.tensor([500]),  # sigma 0.5
        noise=torch.tensor([[[[3.0, -1.0]]]]),
        drop_mask=None,
    )
    seen: dict[str, Tensor] = {}

    def returns_x_t(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        seen.update(x=x, timestep=timestep)
        return x

    loss, aux = flow_matching_loss(returns_x_t, x0, None, cfg=cfg, draws=draws)
    # x_t = [2, 0], target = noise - x0 = [2, -2]; prediction x_t: errors [0, 2]; mean of squares = 2.
    assert loss.item() == 2.0
    assert seen["x"].flatten().tolist() == [2.0, 0.0]
    # The network sees 1000 * sigma as a float32 timestep, not 1 - sigma.
    assert seen["timestep"].dtype == torch.float32 and seen["timestep"].tolist() == [500.0]
    assert aux["sigma"].tolist() == [0.5] and aux["target"].flatten().tolist() == [2.0, -2.0]
    assert aux["loss_per_sample"].tolist() == [2.0]


def test_loss_is_zero_for_the_exact_velocity_field() -> None:
    # Data = a single point x_star. The exact velocity of the linear path from a point mass is
    # (x_t - x_star) / sigma, which a field can compute from x_t and the timestep alone.
    x_star = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    x0 = x_star.expand(64, 4, 1, 1)

    def point_mass_velocity(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        sigma = (timestep / 1000.0).view(-1, 1, 1, 1)
        return (x - x_star) / sigma

    loss, aux = flow_matching_loss(point_mass_velocity, x0, None, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    assert float(aux["target"].abs().mean()) > 0.5  # the target itself is far from zero


def test_loss_is_float32_and_differentiable() -> None:
    weight = torch.tensor(0.3, requires_grad=True)

    def bf16_field(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        return (weight * x).to(torch.bfloat16)

    x0 = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    loss, _ = flow_matching_loss(bf16_field, x0, None, torch.Generator().manual_seed(1))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert weight.grad is not None and weight.grad.item() != 0.0


def test_loss_applies_dropout_to_the_condition_the_network_sees() -> None:
    x0 = torch.zeros(8, 1, 1, 1)
    condition = torch.arange(1.0, 9.0).view(8, 1, 1).expand(8, 2, 3).clone()
    draws = FlowMatchingDraws(
        index=torch.zeros(8, dtype=torch.long),
        noise=torch.zeros(8, 1, 1, 1),
        drop_mask=torch.tensor([True, False, False, True, False, False, False, False]),
    )
    seen: list[Tensor] = []

    def record(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        assert condition is not None
        seen.append(condition)
        return torch.zeros_like(x)

    flow_matching_loss(record, x0, condition, draws=draws)
    assert seen[0][:, 0, 0].tolist() == [0.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0, 8.0]
    assert condition[0, 0, 0] == 1.0  # the caller's tensor is not modified in place


def test_seeded_generators_make_loss_and_sampling_reproducible() -> None:
    x0 = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    condition = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1))
    cfg = FlowMatchingConfig(cfg_dropout=0.5)

    def field(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        assert condition is not None
        return (
            0.5 * x + condition.mean(dim=(1, 2)).view(-1, 1, 1, 1) + timestep.float().view(-1, 1, 1, 1) / 1000
        )

    def run(seed: int) -> tuple[Tensor, dict[str, Tensor]]:
        return flow_matching_loss(field, x0, condition, torch.Generator().manual_seed(seed), cfg)

    (loss_a, aux_a), (loss_b, aux_b), (loss_c, aux_c) = run(7), run(7), run(8)
    assert loss_a.item() == loss_b.item()
    for key in ("index", "noise", "drop_mask", "x_t", "prediction"):
        assert torch.equal(aux_a[key], aux_b[key]), key
    assert not torch.equal(aux_a["noise"], aux_c["noise"]) and loss_a.item() != loss_c.item()

    noise_a = initial_noise((2, 4, 2, 2), torch.Generator().manual_seed(3))
    noise_b = initial_noise((2, 4, 2, 2), torch.Generator().manual_seed(3))
    assert torch.equal(noise_a, noise_b)
    assert not torch.equal(noise_a, initial_noise((2, 4, 2, 2), torch.Generator().manual_seed(4)))
    sample_a = sample_euler(field, noise_a, condition[:2], steps=5)
    sample_b = sample_euler(field, noise_b, condition[:2], steps=5)
    assert torch.equal(sample_a, sample_b)


# ----------------------------------------------------------------------------------------------------------
# Sampler, checked by hand


class RecordingField:
    """Wraps a field ``f(x, timestep, condition)`` and records every call's inputs."""

    def __init__(self, field: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> None:
        self.field = field
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def __call__(self, x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        self.calls.append((x.clone(), timestep.clone(), None if condition is None else condition.clone()))
        return self.field(x, timestep, condition)


def test_euler_one_step_with_a_linear_field_by_hand() -> None:
    field = RecordingField(lambda x, t, c: 2 * x + 1)
    noise = torch.tensor([[1.0, -2.0]])
    # One step: sigma 1 -> 0, v = 2x + 1 at x = noise; x <- noise + (0 - 1) v = -noise - 1.
    x0_hat = sample_euler(field, noise, None, steps=1)
    assert x0_hat.tolist() == [[-2.0, 1.0]]
    assert field.calls[0][1].tolist() == [1000] and field.calls[0][1].dtype == torch.int64


def test_euler_from_a_start_sigma_follows_the_grid_below_it() -> None:
    x0, noise = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    # The exact velocity of the straight path (noise - x0) carries x_s back to x0 from any level.
    field = RecordingField(lambda x, t, c: noise - x0)
    x0_hat = sample_euler(field, interpolate(x0, noise, torch.tensor(0.6)), None, steps=5, start_sigma=0.6)
    assert torch.allclose(x0_hat, x0)
    # The 5-step grid is 1, 0.8, 0.6, 0.4, 0.2, 0: entered at 0.6, the steps are 0.6 -> 0.4 -> 0.2 -> 0.
    assert [call[1].tolist() for call in field.calls] == [[600], [400], [200]]
    full = sample_euler(lambda x, t, c: 2 * x + 1, noise, None, steps=5)
    assert torch.equal(sample_euler(lambda x, t, c: 2 * x + 1, noise, None, steps=5, start_sigma=1.0), full)
    with pytest.raises(ValueError, match="start_sigma"):
        sample_euler(field, noise, None, start_sigma=0.0)


def test_euler_two_steps_with_a_linear_field_by_hand() -> None:
    field = RecordingField(lambda x, t, c: 2 * x + 1)
    noise = torch.tensor([[1.0, -2.0]])
    # Step 1 (sigma 1 -> 0.5, t = 1000): v = [3, -3]; x = [1, -2] - 0.5 [3, -3] = [-0.5, -0.5].
    # Step 2 (sigma 0.5 -> 0, t = 500): v = [0, 0]; x stays [-0.5, -0.5].
    x0_hat = sample_euler(field, noise, None, steps=2)
    assert x0_hat.tolist() == [[-0.5, -0.5]]
    assert [call[1].tolist() for call in field.calls] == [[1000], [500]]
    assert field.calls[1][0].tolist() == [[-0.5, -0.5]]


@pytest.mark.parametrize("steps", [1, 3, 30])
def test_euler_recovers_a_point_mass_exactly_from_any_noise(steps: int) -> None:
    # Along straight paths to a single data point the velocity (x_t - x_star) / sigma is constant, so
    # Euler integration is exact for any step count. The field maps the int64 network timestep back to
    # the schedule's sigma (floor(1000 sigma) alone would lose the fraction).
    schedule = sampling_schedule(steps)
    # zip stops before the terminal sigma 0, which has no network call.
    sigma_of_timestep = dict(zip(schedule.network_timesteps.tolist(), schedule.sigmas.tolist(), strict=False))
    x_star = torch.tensor([0.25, -3.0, 1.5]).view(1, 3, 1, 1)

    def point_mass_velocity(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        sigma = torch.tensor([sigma_of_timestep[int(t)] for t in timestep]).view(-1, 1, 1, 1)
        return (x - x_star) / sigma

    noise = initial_noise((5, 3, 1, 1), torch.Generator().manual_seed(steps))
    x0_hat = sample_euler(point_mass_velocity, noise, None, steps=steps)
    torch.testing.assert_close(x0_hat, x_star.expand(5, 3, 1, 1), atol=1e-5, rtol=0)

    # The constant field v = noise - x_star (what the network should learn here) is integrated exactly too.
    constant = sample_euler(lambda x, t, c: noise - x_star, noise, None, steps=steps)
    torch.testing.assert_close(constant, x_star.expand(5, 3, 1, 1), atol=1e-5, rtol=0)


def test_cfg_combination_by_hand_in_one_batched_call() -> None:
    # v = 1 + (sum of the sample's condition): unconditional (zeros) -> 1, conditional -> 1 + 2 = 3.
    field = RecordingField(lambda x, t, c: torch.ones_like(x) + c.sum(dim=(1, 2)).view(-1, 1))
    noise = torch.tensor([[10.0, 20.0]])
    condition = torch.tensor([[[0.5, 1.5]]])  # (1, 1, 2), sum 2
    # v = v_u + w (v_c - v_u) = 1 + 3 (3 - 1) = 7; one step: x = noise - 7.
    x0_hat = sample_euler(field, noise, condition, steps=1, cfg_scale=3.0)
    assert x0_hat.tolist() == [[3.0, 13.0]]
    assert len(field.calls) == 1  # both branches in ONE network call
    x_seen, t_seen, c_seen = field.calls[0]
    assert c_seen is not None
    assert x_seen.tolist() == [[10.0, 20.0], [10.0, 20.0]]
    assert t_seen.tolist() == [1000, 1000]
    assert c_seen[0].tolist() == [[0.0, 0.0]]  # unconditional first, zeros_like(condition)
    assert c_seen[1].tolist() == [[0.5, 1.5]]


def test_cfg_batches_unconditional_rows_before_conditional_rows() -> None:
    field = RecordingField(lambda x, t, c: torch.zeros_like(x))
    condition = torch.arange(1.0, 7.0).view(3, 1, 2)
    sample_euler(field, torch.zeros(3, 2), condition, steps=2, cfg_scale=2.0)
    assert len(field.calls) == 2
    for _, timestep, seen in field.calls:
        assert seen is not None and seen.shape == (6, 1, 2) and timestep.shape == (6,)
        assert not seen[:3].any() and torch.equal(seen[3:], condition)


def test_cfg_scale_one_and_missing_condition_skip_the_unconditional_branch() -> None:
    field = RecordingField(
        lambda x, t, c: torch.ones_like(x) + (0 if c is None else c.sum(dim=(1, 2)).view(-1, 1))
    )
    noise = torch.tensor([[10.0, 20.0]])
    condition = torch.tensor([[[0.5, 1.5]]])
    x0_hat = sample_euler(field, noise, condition, steps=1, cfg_scale=1.0)
    assert x0_hat.tolist() == [[7.0, 17.0]]  # v = v_c = 3
    assert len(field.calls) == 1 and field.calls[0][0].shape == (1, 2)

    no_condition = sample_euler(field, noise, None, steps=1)  # default cfg_scale 3, but nothing to guide
    assert no_condition.tolist() == [[9.0, 19.0]]
    assert field.calls[-1][2] is None and field.calls[-1][0].shape == (1, 2)


def test_guidance_weight_inside_and_outside_the_interval() -> None:
    everywhere = FlowMatchingConfig()
    assert [guidance_weight(s, 3.0, everywhere) for s in (1.0, 0.5, 0.0)] == [3.0, 3.0, 3.0]
    interval = FlowMatchingConfig(cfg_sigma_min=0.2, cfg_sigma_max=0.7)
    # Inside (bounds included) the full weight; outside the conditional velocity alone (weight 1).
    assert [guidance_weight(s, 3.0, interval) for s in (0.9, 0.7, 0.2, 0.1)] == [1.0, 3.0, 3.0, 1.0]
    half = FlowMatchingConfig(cfg_sigma_max=0.7, cfg_outside=0.5)
    assert guidance_weight(0.9, 3.0, half) == 2.0  # 1 + 0.5 (3 - 1)
    assert guidance_weight(0.9, 1.0, half) == 1.0  # no guidance asked, none anywhere


def test_euler_guides_only_inside_the_interval() -> None:
    # v = 1 + (sum of the sample's condition): unconditional 1, conditional 3; two steps at sigma 1 and 0.5.
    field = RecordingField(lambda x, t, c: torch.ones_like(x) + c.sum(dim=(1, 2)).view(-1, 1))
    noise = torch.tensor([[10.0, 20.0]])
    condition = torch.tensor([[[0.5, 1.5]]])  # (1, 1, 2), sum 2
    interval = FlowMatchingConfig(cfg_sigma_max=0.6)
    x0_hat = sample_euler(field, noise, condition, interval, steps=2, cfg_scale=3.0)
    # Step 1 (sigma 1 -> 0.5, outside): v = v_c = 3, one branch; step 2 (0.5 -> 0, inside): v = 1 + 3 (3 - 1) = 7.
    assert x0_hat.tolist() == [[10.0 - 0.5 * 3 - 0.5 * 7, 20.0 - 0.5 * 3 - 0.5 * 7]]
    assert [call[0].shape[0] for call in field.calls] == [1, 2]  # the unconditional branch only when guided


def test_sampler_callback_sees_every_step() -> None:
    states: list[tuple[int, Tensor]] = []
    sample_euler(
        lambda x, t, c: torch.ones_like(x),
        torch.zeros(1, 1),
        None,
        steps=4,
        callback=lambda k, x: states.append((k, x.clone())),
    )
    assert [k for k, _ in states] == [0, 1, 2, 3]
    # v = 1 and sigma goes 1 -> 0 in four equal steps, so x decreases by 0.25 each step.
    assert [x.item() for _, x in states] == [-0.25, -0.5, -0.75, -1.0]


# ----------------------------------------------------------------------------------------------------------
# Regression (CLIP + MSE baseline) and the objective switch


def test_regression_loss_and_sample_by_hand() -> None:
    field = RecordingField(lambda x, t, c: c.mean(dim=1).view(-1, 1, 2))  # ignores x and t
    x0 = torch.tensor([[[3.0, -1.0]]])  # (1, 1, 2)
    condition = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # prediction [1, 1]
    # Errors [-2, 2]: mean of squares = 4.
    assert regression_loss(field, x0, condition).item() == 4.0
    x_seen, t_seen, _ = field.calls[0]
    assert not x_seen.any() and x_seen.shape == x0.shape  # the network sees zeros, not a noisy sample
    assert t_seen.tolist() == [0.0]
    sample = sample_regression(field, condition, (1, 1, 2))
    assert sample.tolist() == [[[1.0, 1.0]]] and len(field.calls) == 2  # one call, no steps


def test_build_objective_switch() -> None:
    cfg = FlowMatchingConfig(sample_steps=3)
    flow = build_objective("flow_matching", cfg)
    mse = build_objective("mse", cfg)
    assert isinstance(flow, FlowMatchingObjective) and flow.name == "flow_matching" and flow.cfg is cfg
    assert isinstance(mse, RegressionObjective) and mse.name == "mse"
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("ddpm", cfg)  # type: ignore[arg-type]

    def field(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        assert condition is not None
        return 0.5 * x + condition.mean(dim=(1, 2)).view(-1, 1)

    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    condition = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1))
    flow_loss, flow_aux = flow.loss(field, x0, condition, torch.Generator().manual_seed(2))
    expected_loss, _ = flow_matching_loss(field, x0, condition, torch.Generator().manual_seed(2), cfg)
    assert flow_loss.item() == expected_loss.item() and "sigma" in flow_aux
    mse_loss, _ = mse.loss(field, x0, condition)
    assert mse_loss.item() == regression_loss(field, x0, condition).item()

    noise_a, noise_b = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(flow.sample(field, noise_a, condition), sample_euler(field, noise_a, condition, cfg))
    assert not torch.equal(flow.sample(field, noise_a, condition), flow.sample(field, noise_b, condition))
    # The MSE baseline is deterministic: the noise only gives the shape, different noise gives the same sample.
    assert torch.equal(mse.sample(field, noise_a, condition), mse.sample(field, noise_b, condition))


# ----------------------------------------------------------------------------------------------------------
# Replays of the official fixtures


@pytest.fixture(scope="module")
def train_fixture() -> dict[str, Tensor]:
    assert FIXTURES is not None
    return load_file(FIXTURES / "dit_tiny_train_loss.safetensors")


@pytest.fixture(scope="module")
def sample_fixture() -> dict[str, Tensor]:
    assert FIXTURES is not None
    return load_file(FIXTURES / "dit_tiny_sample_loop.safetensors")


def _train_fixture_draws(recorded: dict[str, Tensor]) -> FlowMatchingDraws:
    level = noise_level_from_uniform(recorded["u"])
    return FlowMatchingDraws(
        index=level.index, noise=recorded["noise"], drop_mask=recorded["drop_mask"].bool()
    )


@needs_fixtures
def test_train_loss_fixture_replay_with_recorded_prediction(train_fixture: dict[str, Tensor]) -> None:
    """Everything but the network: the recorded draws must give the recorded inputs, target and loss."""
    recorded = train_fixture
    level = noise_level_from_uniform(recorded["u"])
    assert torch.equal(level.index, recorded["indices"])
    assert torch.equal(level.sigma, recorded["sigmas"])
    assert torch.equal(level.timestep, recorded["timesteps"])

    def recorded_network(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        torch.testing.assert_close(x, recorded["noisy_latents"], atol=1e-6, rtol=1e-6)
        assert torch.equal(timestep, recorded["timesteps"])
        assert condition is not None and torch.equal(condition, recorded["z_latents_after_drop"])
        return recorded["noise_pred"]

    loss, aux = flow_matching_loss(
        recorded_network, recorded["latents"], recorded["z_latents"], draws=_train_fixture_draws(recorded)
    )
    torch.testing.assert_close(aux["target"], recorded["target"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, recorded["loss"], atol=0, rtol=1e-6)


@needs_fixtures
def test_sample_loop_fixture_schedule_replay(sample_fixture: dict[str, Tensor]) -> None:
    """The official loop's timesteps, batching and Euler updates, with the velocities read off its trajectory.

    The recorded trajectory gives each step's guided velocity v_k = (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k).
    A stand-in network returns v_u = 0 and v_c = v_k / w, so that guidance rebuilds v_k; the sampler must
    then walk the recorded trajectory, and every call must carry the recorded inputs.
    """
    recorded = sample_fixture
    trajectory = recorded["trajectory"]  # (31, 1, C, H, W)
    sigmas = recorded["scheduler_sigmas"]
    guidance = float(recorded["guidance_scale"])
    assert torch.equal(sampling_schedule(30).sigmas, sigmas)
    assert torch.equal(sampling_schedule(30).timesteps, recorded["scheduler_timesteps"])
    step = 0

    def trajectory_network(x: Tensor, timestep: Tensor, condition: Tensor | None) -> Tensor:
        nonlocal step
        assert condition is not None and x.shape[0] == 2
        assert torch.equal(timestep, recorded["dit_timesteps_long"][step].repeat(2))
        assert not condition[0].any() and torch.equal(condition[1], recorded["cond"][0])
        torch.testing.assert_close(x, trajectory[step].repeat(2, 1, 1, 1), atol=1e-5, rtol=1e-5)
        velocity = (trajectory[step + 1] - trajectory[step]) / (sigmas[step + 1] - sigmas[step])
        step += 1
        return torch.cat([torch.zeros_like(velocity), velocity / guidance])

    x0_hat = sample_euler(trajectory_network, recorded["latents_init"], recorded["cond"], cfg_scale=guidance)
    assert step == 30
    torch.testing.assert_close(x0_hat, recorded["latents_final"], atol=1e-5, rtol=1e-5)


# -- with the project's DiT (blip3o.models.dit), when it exists


def _tiny_dit() -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The project's DiT with the fixture's tiny weights, or a skip saying why not."""
    try:
        from blip3o.models.dit import DiT, DiTConfig
    except ImportError as error:
        pytest.skip(f"blip3o.models.dit is not importable yet ({error}); fixture replay needs the DiT")
    assert FIXTURES is not None
    official = json.loads((FIXTURES / "dit_tiny_config.json").read_text())["config"]
    model = DiT(DiTConfig.from_dict(official))
    model.load_state_dict(load_file(FIXTURES / "dit_tiny_weights.safetensors"))
    return model.eval()


@needs_fixtures
def test_train_loss_fixture_replay_with_dit(train_fixture: dict[str, Tensor]) -> None:
    dit = _tiny_dit()
    recorded = train_fixture
    with torch.no_grad():
        loss, aux = flow_matching_loss(
            dit, recorded["latents"], recorded["z_latents"], draws=_train_fixture_draws(recorded)
        )
    torch.testing.assert_close(aux["prediction"], recorded["noise_pred"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, recorded["loss"], atol=1e-5, rtol=1e-5)


@needs_fixtures
def test_sample_loop_fixture_replay_with_dit(sample_fixture: dict[str, Tensor]) -> None:
    dit = _tiny_dit()
    recorded = sample_fixture
    states: list[Tensor] = [recorded["latents_init"]]
    x0_hat = sample_euler(
        dit,
        recorded["latents_init"],
        recorded["cond"],
        steps=30,
        cfg_scale=float(recorded["guidance_scale"]),
        callback=lambda k, x: states.append(x.clone()),
    )
    torch.testing.assert_close(torch.stack(states), recorded["trajectory"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_hat, recorded["latents_final"], atol=1e-5, rtol=1e-5)
