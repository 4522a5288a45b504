"""Count guidance: the sampler's clean-target estimate steered towards the counts the prompt names."""

from __future__ import annotations

import pytest
import torch

from blip3o.cli import generate as generate_cli
from blip3o.models.count_guidance import count_steer, prompt_shape_counts, shape_count_error
from blip3o.transport import (
    FlowMatchingConfig,
    build_objective,
    initial_noise,
    sample_euler,
    sampling_schedule,
    steered_velocity,
)
from blip3o.world.language import noun_phrases
from blip3o.world.scene import SHAPES
from conftest import save_untrained_tiny_model, tiny_object_label_model

CIRCLE, STAR = SHAPES.index("circle"), SHAPES.index("star")


def _linear_field(x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    return 0.5 * x  # any field: the steer decides where the samples go


# ---- the sampler maths, without a network ------------------------------------------------------------------


def test_steered_velocity_implies_the_moved_estimate() -> None:
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    target = torch.randn(3, 2, 4, 4)
    steered = steered_velocity(x, v, 0.4, lambda estimate, sigma: target)
    torch.testing.assert_close(x - 0.4 * steered, target)  # the new velocity's estimate is the steer's
    torch.testing.assert_close(steered_velocity(x, v, 0.4, lambda e, s: e), v)  # unchanged estimate
    assert steered_velocity(x, v, 0.0, lambda e, s: target) is v  # no velocity to steer at sigma 0


def test_euler_with_an_identity_steer_is_the_plain_sampler() -> None:
    noise = initial_noise((2, 3, 4, 4), torch.Generator().manual_seed(0))
    plain = sample_euler(_linear_field, noise, None, steps=6)
    seen = []
    steered = sample_euler(_linear_field, noise, None, steps=6, steer=lambda e, s: seen.append(s) or e)
    torch.testing.assert_close(steered, plain)
    # Called once per step, with the step's noise level.
    assert seen == pytest.approx(sampling_schedule(6).sigmas[:-1].tolist())


def test_euler_steered_to_a_fixed_estimate_lands_on_it() -> None:
    # x_k = c + sigma_k a stays on the straight path to c when every step's estimate is c.
    noise = initial_noise((2, 3, 4, 4), torch.Generator().manual_seed(1))
    goal = torch.full((2, 3, 4, 4), 0.7)
    out = sample_euler(_linear_field, noise, None, steps=5, steer=lambda e, s: goal)
    torch.testing.assert_close(out, goal, atol=1e-5, rtol=0)


def test_the_regression_objective_refuses_a_steer() -> None:
    objective = build_objective("mse", FlowMatchingConfig())
    with pytest.raises(ValueError, match="no sampling trajectory"):
        objective.sample(_linear_field, torch.zeros(1, 2, 2, 2), None, steer=lambda e, s: e)


# ---- what the prompt names ---------------------------------------------------------------------------------


def test_noun_phrases_and_shape_counts_of_prompts() -> None:
    assert noun_phrases("a photo of a red circle and two Stars") == [(1, "red", "circle"), (2, None, "star")]
    counts, known = prompt_shape_counts(
        [
            "a photo of three stars",
            "a photo of a circle left of a star",
            "a photo of a circle and a circle",
            "hi",
        ]
    )
    assert known.tolist() == [True, True, True, False]
    assert counts[0, STAR] == 3 and counts[0].sum() == 3
    assert counts[1, CIRCLE] == 1 and counts[1, STAR] == 1 and counts[1].sum() == 2
    assert counts[2, CIRCLE] == 2
    assert counts[3].sum() == 0


def test_shape_count_error_by_hand() -> None:
    readings = torch.zeros(2, 3, 19)  # 3 tokens; shapes first in SHAPES order
    readings[0, 0, CIRCLE], readings[0, 1, CIRCLE], readings[0, 2, STAR] = 1.0, 0.5, 0.25
    readings[1, 0, STAR] = 1.0
    counts = torch.zeros(2, len(SHAPES))
    counts[:, STAR] = 2.0
    error = shape_count_error(readings, counts, torch.tensor([True, False]))
    # Row 0: circles 1.5 against 0, stars 0.25 against 2; row 1 is not known.
    torch.testing.assert_close(error, torch.tensor([1.5 + 1.75, 0.0]))


# ---- the steer, on a differentiable toy reader ---------------------------------------------------------------


def _toy_reader(estimate: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) -> (B, g*g, 19): channel 0 of a token is the logit of "star" against "none" (the rest 0)."""
    logits = estimate[:, 0].flatten(1)  # (B, N)
    readings = torch.zeros(*logits.shape, 19)
    readings[..., STAR] = torch.sigmoid(logits)
    readings[..., len(SHAPES)] = 1 - torch.sigmoid(logits)  # "none"
    return readings


def test_count_steer_moves_wrong_counts_towards_the_named_ones_and_leaves_right_ones() -> None:
    estimate = torch.full((3, 2, 2, 2), -6.0)  # 4 tokens each, all "none"
    estimate[1, 0, 0, :] = 6.0  # row 1 holds two stars already
    counts, known = prompt_shape_counts(["a photo of two stars", "a photo of two stars", "hello"])
    steer = count_steer(_toy_reader, counts, known, strength=4.0, sigma_min=0.3)
    before = shape_count_error(_toy_reader(estimate), counts, known)
    moved = steer(estimate, 0.8)
    after = shape_count_error(_toy_reader(moved), counts, known)
    assert after[0] < before[0] - 0.3  # row 0 gains stars (1.99 -> 1.52)
    torch.testing.assert_close(moved[1], estimate[1], atol=1e-3, rtol=0)  # right already: (almost) unmoved
    torch.testing.assert_close(moved[2], estimate[2])  # no phrase: not steered
    # Below sigma_min, and at strength 0, nothing moves.
    assert torch.equal(steer(estimate, 0.2), estimate)
    assert torch.equal(count_steer(_toy_reader, counts, known, 0.0)(estimate, 0.8), estimate)


def test_count_steer_rejects_bad_settings() -> None:
    counts, known = prompt_shape_counts(["a photo of two stars"])
    with pytest.raises(ValueError, match=">= 0"):
        count_steer(_toy_reader, counts, known, -1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        count_steer(_toy_reader, counts, known, 1.0, sigma_min=1.5)


# ---- the model and the CLI -----------------------------------------------------------------------------------


def test_model_count_guidance_changes_samples_deterministically() -> None:
    model = tiny_object_label_model()
    prompts = ["a photo of three stars", "a photo of a red circle"]
    plain = model.generate_target(prompts, 4, 2.0, torch.Generator().manual_seed(0))
    guided = model.generate_target(prompts, 4, 2.0, torch.Generator().manual_seed(0), count_guidance=5.0)
    again = model.generate_target(prompts, 4, 2.0, torch.Generator().manual_seed(0), count_guidance=5.0)
    assert not torch.allclose(plain, guided)
    assert torch.equal(guided, again)  # same seed, same samples


def test_cli_refuses_bad_count_guidance(tmp_path, capsys) -> None:
    assert (
        generate_cli.main(["a photo of two stars", "--count-guidance", "-1", "-o", str(tmp_path / "a.png")])
        == 2
    )
    assert "--count-guidance must be a finite number >= 0" in capsys.readouterr().err
    # A model without CLIP's object label head cannot read counts: said before any sampling.
    folder = tmp_path / "plain"
    save_untrained_tiny_model(folder)
    code = generate_cli.main(
        [
            "a photo of two stars",
            "--model",
            str(folder),
            "--count-guidance",
            "5",
            "-o",
            str(tmp_path / "b.png"),
        ]
    )
    assert code == 2
    assert "object label head" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_count_guidance_needs_a_clip_target() -> None:
    from blip3o.models.blip3o import Blip3o, tiny_vae_config

    model = Blip3o.from_config(tiny_vae_config(tokenizer_corpus_scenes=50), seed=0).eval()
    with pytest.raises(ValueError, match="CLIP target"):
        model.generate_target(
            ["a photo of two stars"], 2, 2.0, torch.Generator().manual_seed(0), count_guidance=5.0
        )
