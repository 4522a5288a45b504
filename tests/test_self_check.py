"""Self-checked sampling (blip3o.eval.self_check): the prompt's checks, their scores, and which candidate is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blip3o.cli import generate
from blip3o.eval.self_check import (
    answer_log_probs,
    check_scores,
    generate_self_checked,
    prompt_checks,
    round_seed,
)
from blip3o.models.blip3o import Blip3o
from blip3o.world.prompts import load_eval_prompts
from conftest import save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"steps": 2, "decoder_steps": 2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Blip3o, Path]:
    folder = tmp_path_factory.mktemp("model") / "final"
    return save_untrained_tiny_model(folder), folder


def test_prompt_checks_read_counts_shapes_and_colours_from_the_words() -> None:
    assert prompt_checks("a photo of a red circle and an orange square") == [
        ("how many shapes are there?", "two"),
        ("how many circles are there?", "one"),
        ("how many squares are there?", "one"),
        ("what shape is the red object?", "circle"),
        ("what shape is the orange object?", "square"),
    ]
    assert prompt_checks("a photo of three stars") == [
        ("how many shapes are there?", "three"),
        ("how many stars are there?", "three"),
    ]
    # Position words are not checked; a repeated shape is counted once with both counts.
    assert prompt_checks("A photo of a circle left of a circle") == [
        ("how many shapes are there?", "two"),
        ("how many circles are there?", "two"),
    ]
    # A colour shared by two objects does not name one, so it is not asked about.
    assert ("what shape is the red object?", "star") not in prompt_checks("a red star and a red cross")
    assert prompt_checks("something pretty") == []
    # Five objects: past the count words, so only what can be answered is asked.
    assert prompt_checks("four circles and a red star") == [
        ("how many circles are there?", "four"),
        ("how many stars are there?", "one"),
        ("what shape is the red object?", "star"),
    ]
    # Every ShapesGenEval prompt yields checks, and the total count is always asked first.
    for record in load_eval_prompts():
        checks = prompt_checks(record["prompt"])
        total = sum(int(item["count"]) for item in record["include"])
        assert checks[0] == ("how many shapes are there?", ["zero", "one", "two", "three", "four"][total])


def test_check_scores_sum_each_prompts_answer_log_probs(saved: tuple[Blip3o, Path]) -> None:
    model = saved[0]
    images = model.generate(["a red circle", "two stars"], num_images=1, seed=0, **FAST)
    prompts = ["a photo of a red circle and a blue star", "a photo of two stars"]
    scores = check_scores(model, images, prompts, chunk=3)  # chunks smaller than one prompt's checks
    for image, prompt, score in zip(images, prompts, scores, strict=True):
        questions, answers = zip(*prompt_checks(prompt), strict=True)
        expected = answer_log_probs(model, [image] * len(questions), questions, answers).sum()
        assert score == pytest.approx(float(expected), rel=1e-4)
        assert score < 0  # a sum of log-probabilities
    assert check_scores(model, images[:1], ["no shapes named here"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="images"):
        check_scores(model, images, prompts[:1])


def test_generate_self_checked_keeps_the_best_scored_candidate_of_each_group(
    saved: tuple[Blip3o, Path],
) -> None:
    model = saved[0]
    prompts = ["a photo of two circles", "a photo of a green square"]
    kept, kept_scores = generate_self_checked(model, prompts, candidates=3, num_images=2, seed=5, **FAST)
    drawn = model.generate(prompts, num_images=6, seed=5, **FAST)  # the candidates, prompt-major
    scores = check_scores(model, drawn, [p for p in prompts for _ in range(6)]).view(4, 3)  # (images, K)
    assert len(kept) == 4 and torch.allclose(kept_scores, scores.max(1).values)
    for g, image in enumerate(kept):
        best = drawn[g * 3 + int(scores[g].argmax())]
        assert np.array_equal(np.asarray(image), np.asarray(best))
    again, _ = generate_self_checked(model, prompts, candidates=3, num_images=2, seed=5, **FAST)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(kept, again, strict=True))
    one, _ = generate_self_checked(model, prompts, candidates=1, seed=5, **FAST)
    plain = model.generate(prompts, num_images=1, seed=5, **FAST)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one, plain, strict=True))
    with pytest.raises(ValueError, match="candidates"):
        generate_self_checked(model, prompts, candidates=0)


def test_accept_stops_at_the_first_believed_candidate_and_redraws_only_the_doubted(
    saved: tuple[Blip3o, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = saved[0]
    prompts = ["a photo of two circles", "a photo of a green square", "a photo of three stars", "a red cross"]
    first = model.generate(prompts, num_images=1, seed=7, **FAST)  # round 0 is plain sampling
    first_scores = check_scores(model, first, prompts)
    # A bar between the second and third score: two prompts believed at round 0, two doubted.
    low, high = sorted(first_scores.tolist())[1:3]
    assert low < high
    accept = float(np.exp((low + high) / 2))
    believed = [s >= (low + high) / 2 for s in first_scores.tolist()]

    calls: list[tuple[list[str], int, list]] = []
    original = model.generate

    def recording(texts: list[str], num_images: int = 1, seed: int = 0, **kw: object) -> list:
        images = original(texts, num_images=num_images, seed=seed, **kw)
        calls.append((list(texts), seed, images))
        return images

    monkeypatch.setattr(model, "generate", recording)
    kept, kept_scores = generate_self_checked(model, prompts, candidates=3, seed=7, accept=accept, **FAST)
    assert [c[1] for c in calls[:2]] == [round_seed(7, 0), round_seed(7, 1)] and round_seed(7, 0) == 7
    assert calls[0][0] == prompts
    # Round 1 draws only for the doubted prompts; no round draws for a prompt after it was believed.
    assert calls[1][0] == [p for p, b in zip(prompts, believed, strict=True) if not b]
    assert len(calls) <= 3 and all(set(c[0]) <= set(calls[1][0]) for c in calls[1:])
    for i, prompt in enumerate(prompts):
        candidates = [
            im for texts, _, images in calls for t, im in zip(texts, images, strict=True) if t == prompt
        ]
        scores = torch.cat([check_scores(model, [im], [prompt]) for im in candidates])
        assert kept_scores[i] == pytest.approx(float(scores.max()), abs=1e-4)
        assert np.array_equal(np.asarray(kept[i]), np.asarray(candidates[int(scores.argmax())]))
        if believed[i]:
            assert len(candidates) == 1 and np.array_equal(np.asarray(kept[i]), np.asarray(first[i]))
    # A prompt with nothing to check is believed at once: plain sampling.
    monkeypatch.setattr(model, "generate", original)
    plain, _ = generate_self_checked(model, ["something pretty"], candidates=4, seed=3, accept=1.0, **FAST)
    assert np.array_equal(np.asarray(plain[0]), np.asarray(original(["something pretty"], seed=3, **FAST)[0]))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="accept"):
            generate_self_checked(model, prompts, candidates=2, accept=bad)


def test_generate_cli_self_check_writes_the_kept_images(
    saved: tuple[Blip3o, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, folder = saved
    args = ["a photo of two circles", "--model", str(folder), "--steps", "2", "--decoder-steps", "2"]
    assert generate.main([*args, "--self-check", "3", "--seed", "2", "-o", str(tmp_path / "a.png")]) == 0
    assert "best of 3" in capsys.readouterr().out
    kept, _ = generate_self_checked(model, ["a photo of two circles"], candidates=3, seed=2, **FAST)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(kept[0]))
    assert generate.main([*args, "--self-check", "0", "-o", str(tmp_path / "b.png")]) == 2
    assert "--self-check must be >= 1" in capsys.readouterr().err
    accepted = [
        *args,
        "--self-check",
        "3",
        "--seed",
        "2",
        "--self-check-accept",
        "0.5",
        "-o",
        str(tmp_path / "c.png"),
    ]
    assert generate.main(accepted) == 0
    assert "first of up to 3" in capsys.readouterr().out
    kept, _ = generate_self_checked(
        model, ["a photo of two circles"], candidates=3, seed=2, accept=0.5, **FAST
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(kept[0]))
    assert generate.main([*args, "--self-check-accept", "0.5", "-o", str(tmp_path / "d.png")]) == 2
    assert "needs --self-check K" in capsys.readouterr().err
    assert (
        generate.main([*args, "--self-check", "2", "--self-check-accept", "2", "-o", str(tmp_path / "e.png")])
        == 2
    )
    assert "probability in (0, 1]" in capsys.readouterr().err
