"""`blip3o demo` on an untrained tiny model (the mechanics: files, keys, counts, errors) and on a stub that
answers perfectly (the scoring: a model that draws every prompt and knows every answer scores 1.0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip3o import bundled
from blip3o.cli import demo
from blip3o.data.shards import generate_sample
from blip3o.eval.demo import DEMO_WORLD_SEED, demo_prompts, run_demo
from blip3o.models.blip3o import tiny_config
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import CATEGORIES
from blip3o.world.render import render
from conftest import save_untrained_tiny_model

FAST = ["--steps", "2", "--decoder-steps", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "model"
    save_untrained_tiny_model(folder)
    return folder


def test_demo_prompts_are_balanced_and_fixed() -> None:
    prompts = demo_prompts()
    assert prompts == demo_prompts()
    counts = Counter(record["tag"] for _, record in prompts)
    assert [counts[tag] for tag in CATEGORIES] == [3, 3, 3, 3, 2, 2]


def test_demo_writes_grid_report_and_summary(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bundled, "model_path", lambda: model_dir)  # no --model: the bundled one
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--seed", "1", *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "report.html", "summary.json"]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"model", "seed", "settings", "note", "geneval", "vqa", "timing", "files"}
    assert summary["model"] == str(model_dir) and summary["seed"] == 1
    assert summary["settings"]["steps"] == 2 and summary["settings"]["decoder_steps"] == 2
    assert summary["settings"]["cfg_scale"] == 3.0  # not given: the model's own, written as a number
    assert summary["settings"]["cfg_sigma_range"] == [0.0, 1.0]  # and its guidance interval (all steps)
    # No --self-check: the demo's default sampler, the self-checked pick of up to 4 accepted at 0.25.
    assert (summary["settings"]["self_check"], summary["settings"]["self_check_accept"]) == (4, 0.25)
    gen, vqa = summary["geneval"], summary["vqa"]
    assert list(gen["categories"]) == list(CATEGORIES) and gen["images"] == gen["prompts"] == 16
    assert len(gen["items"]) == 16 and all(isinstance(i["correct"], bool) for i in gen["items"])
    assert 0.0 <= gen["overall"] <= 1.0
    assert vqa["n"] == len(vqa["items"]) == 16 and vqa["world_seed"] == DEMO_WORLD_SEED + 1
    assert {"question", "answer", "expected", "correct", "kind", "scene"} <= set(vqa["items"][0])
    assert vqa["accuracy"] == vqa["correct"] / 16
    assert set(summary["timing"]) == {"load_s", "generate_s", "judge_s", "answer_s", "total_s"}
    assert summary["files"]["grid"] == str(out / "grid.png")

    with Image.open(out / "grid.png") as grid:
        assert grid.width == 8 * 160 and grid.height > 2 * 160  # 16 images, 8 to a row, labels below
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 32  # 16 generated + 16 questions' scenes
    assert page.count("src=") == 32  # self-contained: nothing else is fetched
    assert str(model_dir) in page and "seed 1" in page

    printed = capsys.readouterr().out
    assert "GenEval overall" in printed and "VQA" in printed and str(out / "report.html") in printed


class PerfectModel:
    """Draws a render of every prompt and knows every demo answer: what the demo should score 1.0."""

    config = tiny_config()
    device = "cpu"

    def __init__(self, seed: int) -> None:
        self.records = {record["prompt"]: record for _, record in demo_prompts()}
        self.answers = {}
        for i in range(8):
            scene, annotation = generate_sample(DEMO_WORLD_SEED + seed, i)
            for qa in annotation.qa:
                self.answers[np.asarray(render(scene)).tobytes(), qa.question] = f"The {qa.answer}."

    def generate(self, prompts: list[str], seed: int, **_: object) -> list[Image.Image]:
        rng = np.random.default_rng(seed)
        return [render(scene_for_prompt(self.records[p], rng)) for p in prompts]

    def understand(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]:
        return [self.answers[np.asarray(im).tobytes(), q] for im, q in zip(images, prompts, strict=True)]


def test_demo_self_check_draws_the_self_checked_images(model_dir: Path, tmp_path: Path) -> None:
    from blip3o.eval.demo import generate_images, sampling_settings
    from blip3o.eval.self_check import generate_self_checked
    from blip3o.models.blip3o import Blip3o

    out = tmp_path / "demo"
    argv = ["--model", str(model_dir), "--out", str(out), "--seed", "3", *FAST]
    assert demo.main([*argv, "--self-check", "2", "--self-check-accept", "0.5"]) == 0
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["self_check"] == 2 and settings["self_check_accept"] == 0.5
    model = Blip3o.from_pretrained(model_dir).eval()
    prompts = demo_prompts()
    images = generate_images(model, prompts, 3, sampling_settings(model, 2, None, 2, 2, 0.5))
    kept, _ = generate_self_checked(
        model,
        [r["prompt"] for _, r in prompts],
        2,
        seed=3,
        accept=0.5,
        steps=2,
        decoder_steps=2,
        batch_size=16,
    )
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, kept, strict=True))


def test_demo_scores_a_perfect_model_one(tmp_path: Path) -> None:
    summary = run_demo(PerfectModel(seed=2), "stub", tmp_path, seed=2)  # type: ignore[arg-type]
    assert summary["geneval"]["overall"] == 1.0 and all(i["correct"] for i in summary["geneval"]["items"])
    assert summary["vqa"]["accuracy"] == 1.0  # "The two." matches "two" after normalisation
    assert "fail" not in (tmp_path / "report.html").read_text()


def test_demo_errors(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "demo")]
    cases = [
        (["--model", str(tmp_path / "missing"), *out], "model folder"),
        (["--model", str(model_dir), "--steps", "0", *out], "--steps must be >= 1"),
        (["--model", str(model_dir), "--seed", "-1", *out], "--seed must be >= 0"),
        (["--model", str(model_dir), "--self-check", "0", *out], "--self-check must be >= 1"),
        (
            ["--model", str(model_dir), "--self-check", "1", "--self-check-accept", "0.5", *out],
            "needs --self-check K",
        ),
        (["--model", str(model_dir), "--out", str(model_dir / "config.json")], "is a file; give a folder"),
    ]
    monkeypatch.setattr(bundled, "model_path", lambda: tmp_path / "not_bundled")
    cases.append((out, "no bundled model in this install; pass --model PATH"))
    for argv, needle in cases:
        assert demo.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("blip3o demo: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "demo" / "summary.json").exists()


def test_demo_through_the_real_command(tmp_path: Path) -> None:
    """The installed entry point knows `demo`; a bad model folder is exit 2 and one line, before torch loads."""
    cmd = [sys.executable, "-m", "blip3o.cli.main", "demo", "--model", str(tmp_path / "nope")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"blip3o demo: error: model folder {tmp_path / 'nope'} does not exist\n"
