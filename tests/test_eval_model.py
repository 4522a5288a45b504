"""`blip3o eval geneval --model` and `blip3o eval vqa --model` on a saved untrained tiny model: the sample
layout, per-seed scores, the mean ± std summary, determinism, the subset helpers, and one-line errors.
An untrained model draws noise: these tests check the mechanics, and that the judge gives noise no credit."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from blip3o.cli import eval_geneval, eval_vqa
from blip3o.eval.geneval import METADATA_FILE, SAMPLES_SUBDIR, SCORES_FILE
from blip3o.eval.model_eval import (
    SUMMARY_FILE,
    SUMMARY_TABLE_FILE,
    ResumeError,
    aggregate_seeds,
    balanced_subset,
    batch_seed,
    check_resumable,
    geneval_with_model,
    plan_batches,
    vqa_with_model,
)
from blip3o.models.blip3o import Blip3o
from blip3o.world.prompts import CATEGORIES, load_eval_prompts
from conftest import save_untrained_tiny_model

# Sampling mechanics need neither 30 + 20 steps nor the decoder's guidance (which doubles its batch), and
# batches of 16 run faster than 64 on one CPU thread. The images depend on --batch-size, so every run that
# is compared uses the same options.
FAST = ["--steps", "2", "--decoder-steps", "2", "--decoder-cfg-scale", "1", "--batch-size", "16"]
SUBSET = ["--max-prompts", "12"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Blip3o, Path]:
    """One untrained tiny model and the folder it is saved in."""
    folder = tmp_path_factory.mktemp("model") / "final"
    return save_untrained_tiny_model(folder), folder


@pytest.fixture(scope="module")
def model_dir(saved: tuple[Blip3o, Path]) -> Path:
    return saved[1]


def _main(module, argv: list[str]) -> tuple[int, str, str]:
    """Run a command's main, returning (exit code, stdout, stderr); usable from module-scoped fixtures."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = module.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def two_seeds(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One run over seeds 0 and 1 of the 12-prompt subset, with the progress bar on."""
    out = tmp_path_factory.mktemp("geneval") / "run"
    code, stdout, stderr = _main(
        eval_geneval, ["--model", str(model_dir), "--out", str(out), *SUBSET, "--seeds", "0,1", *FAST]
    )
    assert code == 0, stderr
    return out, stdout, stderr


def _subset_records() -> list[tuple[int, dict]]:
    return balanced_subset(load_eval_prompts(), 12)


# ---------------------------------------------------------------------------------------------- GenEval


def test_geneval_writes_the_layout_for_every_seed(two_seeds: tuple[Path, str, str]) -> None:
    out, _, stderr = two_seeds
    subset = _subset_records()
    n_images = sum(r["n_samples"] for _, r in subset)
    for seed in (0, 1):
        folder = out / f"seed_{seed}"
        # Folders are named by the prompt's line in the full prompt file, so a subset keeps the names.
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [f"{i:05d}" for i, _ in subset]
        for index, record in subset:
            meta = json.loads((folder / f"{index:05d}" / METADATA_FILE).read_text())
            assert meta == record
            pngs = sorted((folder / f"{index:05d}" / SAMPLES_SUBDIR).glob("*.png"))
            assert [p.name for p in pngs] == [f"{k:04d}.png" for k in range(record["n_samples"])]
        scores = json.loads((folder / SCORES_FILE).read_text())
        assert scores["images"] == n_images and scores["prompts"] == 12
    # One progress bar over all images of both seeds.
    assert f"{2 * n_images}/{2 * n_images}" in stderr


def test_geneval_summary_is_mean_and_std_of_the_seeds(two_seeds: tuple[Path, str, str]) -> None:
    out, stdout, _ = two_seeds
    summary = json.loads((out / SUMMARY_FILE).read_text())
    per_seed = [json.loads((out / f"seed_{s}" / SCORES_FILE).read_text()) for s in (0, 1)]
    overalls = [p["overall"] for p in per_seed]
    assert summary["seeds"] == [0, 1]
    assert summary["overall"]["mean"] == pytest.approx(np.mean(overalls))
    assert summary["overall"]["std"] == pytest.approx(np.std(overalls, ddof=1))
    assert summary["overall"]["per_seed"] == overalls
    assert list(summary["categories"]) == list(CATEGORIES)  # 12 prompts: 2 from each category
    for tag, stats in summary["categories"].items():
        accs = [p["categories"][tag]["accuracy"] for p in per_seed]
        assert stats["mean"] == pytest.approx(np.mean(accs))
    assert summary["subset"] == {"prompts": 12, "of": len(load_eval_prompts())}
    assert summary["settings"]["batch_size"] == 16 and summary["settings"]["steps"] == 2
    assert summary["settings"]["cfg_outside"] == 0.0  # the model's guidance interval is reported too
    # The printed table is the one written, and says that a subset was scored.
    table = (out / SUMMARY_TABLE_FILE).read_text()
    assert table.strip() in stdout and "SUBSET: 12 of 560 prompts" in table
    assert f"{summary['overall']['mean']:.4f} ± {summary['overall']['std']:.4f}" in table


def test_geneval_self_check_settings_are_recorded(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "checked"
    argv = ["--model", str(model_dir), "--out", str(out), "--max-prompts", "6", *FAST]
    code, _, stderr = _main(eval_geneval, [*argv, "--self-check", "2", "--self-check-accept", "0.5"])
    assert code == 0, stderr
    settings = json.loads((out / "geneval_summary.json").read_text())["settings"]
    assert settings["self_check"] == 2 and settings["self_check_accept"] == 0.5


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_a_resumed_run_makes_the_images_of_an_uninterrupted_one(
    saved: tuple[Blip3o, Path], tmp_path: Path
) -> None:
    model = saved[0]
    # Batches of 3 images over 2 images per prompt: prompts straddle batches.
    options = {"max_prompts": 6, "images_per_prompt": 2, "batch_size": 3, "steps": 2, "decoder_steps": 2}
    whole = tmp_path / "whole"
    geneval_with_model(model, whole, seeds=[0, 1], progress=False, **options)

    # A run killed during seed 1: seed 0 complete; seed 1's last prompt missing, the one before half-written.
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    (killed / SUMMARY_FILE).unlink()
    prompt_dirs = sorted(p for p in (killed / "seed_1").iterdir() if p.is_dir())
    shutil.rmtree(prompt_dirs[-1])
    (prompt_dirs[-2] / SAMPLES_SUBDIR / "0001.png").unlink()
    with pytest.raises(FileExistsError, match="--resume"):
        geneval_with_model(model, killed, seeds=[0, 1], progress=False, **options)
    summary = geneval_with_model(model, killed, seeds=[0, 1], progress=False, resume=True, **options)
    assert _pngs(killed) == _pngs(whole)
    assert summary["overall"] == json.loads((whole / SUMMARY_FILE).read_text())["overall"]
    # Seed 0 sampled nothing; seed 1 only the batches holding the two unfinished prompts' images.
    assert summary["timing"][0]["sampled_images"] == 0
    assert 0 < summary["timing"][1]["sampled_images"] < summary["images_per_seed"]

    with pytest.raises(ResumeError, match="settings differ"):
        geneval_with_model(
            model, killed, seeds=[0, 1], progress=False, resume=True, **{**options, "steps": 3}
        )
    # A new seed in the same folder with other settings would mix two runs: refused, resumed or not.
    with pytest.raises(ResumeError, match="settings differ"):
        geneval_with_model(model, killed, seeds=[2], progress=False, **{**options, "steps": 3})
    (killed / "geneval_run.json").unlink()
    with pytest.raises(ResumeError, match=r"no geneval_run\.json"):
        geneval_with_model(model, killed, seeds=[0, 1], progress=False, resume=True, **options)


def test_a_run_recorded_before_decoder_candidates_resumes_as_one_decode(tmp_path: Path) -> None:
    settings = {"steps": 2, "decoder_candidates": 1, "count_guidance": 0.0}
    run = {"seeds": [0], "prompts": [[0, 2]], "settings": settings}
    old = {**run, "settings": {"steps": 2}}  # geneval_run.json written before both settings existed
    (tmp_path / "geneval_run.json").write_text(json.dumps(old))
    check_resumable(tmp_path, run)  # one decode, no count guidance
    with pytest.raises(ResumeError, match="settings differ"):
        check_resumable(tmp_path, {**run, "settings": {**settings, "decoder_candidates": 4}})
    with pytest.raises(ResumeError, match="settings differ"):
        check_resumable(tmp_path, {**run, "settings": {**settings, "count_guidance": 10.0}})


def test_untrained_model_scores_near_zero(two_seeds: tuple[Path, str, str]) -> None:
    """The judge gives noise no credit: an untrained model's images must not pass."""
    summary = json.loads((two_seeds[0] / SUMMARY_FILE).read_text())
    assert summary["overall"]["mean"] <= 0.2
    assert all(s <= 0.2 for s in summary["overall"]["per_seed"])


def test_same_seed_same_pngs(model_dir: Path, two_seeds: tuple[Path, str, str], tmp_path: Path) -> None:
    again = tmp_path / "again"
    argv = ["--model", str(model_dir), "--out", str(again), *SUBSET, "--seeds", "0", *FAST, "--no-progress"]
    code, stdout, _ = _main(eval_geneval, argv)
    assert code == 0
    assert "one seed: the std is 0 by definition" in stdout
    first = sorted((two_seeds[0] / "seed_0").rglob("*.png"))
    second = sorted((again / "seed_0").rglob("*.png"))
    assert [p.relative_to(two_seeds[0]) for p in first] == [p.relative_to(again) for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    # ...and another seed draws other images.
    other = two_seeds[0] / "seed_1" / first[0].relative_to(two_seeds[0] / "seed_0")
    assert other.read_bytes() != first[0].read_bytes()


# ------------------------------------------------------------------------------------------------- VQA


def test_vqa_with_model_writes_scores(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores" / "vqa.json"
    code, stdout, stderr = _main(
        eval_vqa, ["--model", str(model_dir), "--n-questions", "14", "--out", str(out), "--no-progress"]
    )
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["n"] == 14 and len(result["answers"]) == 14 and not result["full_set"]
    assert 0.0 <= result["overall"]["mean"] <= 1.0 and result["overall"]["std"] == 0.0
    assert result["correct"] == round(result["overall"]["mean"] * 14)
    assert "greedy decoding" in result["seed_note"]
    assert f"overall: {result['overall']['mean']:.4f} ± 0.0000" in stdout
    assert "NOT THE BENCHMARK: a 14-question set" in stdout


def test_vqa_with_model_keeps_the_models_mode(saved: tuple[Blip3o, Path]) -> None:
    """A training loop may evaluate mid-run: the model comes back in training mode, answers unchanged."""
    model = saved[0]
    first = vqa_with_model(model, n_questions=7, batch_size=4)
    model.train()
    try:
        second = vqa_with_model(model, n_questions=7, batch_size=4)
        assert model.training
    finally:
        model.eval()
    assert first["answers"] == second["answers"]  # evaluated in eval mode both times (no dropout)


# --------------------------------------------------------------------------------------------- helpers


def test_balanced_subset() -> None:
    records = load_eval_prompts()
    subset = balanced_subset(records, 12)
    tags = [r["tag"] for _, r in subset]
    assert all(tags.count(t) == 2 for t in CATEGORIES)
    assert all(records[i] is r for i, r in subset) and [i for i, _ in subset] == sorted(i for i, _ in subset)
    # The remainder goes to the first categories; a category that runs out passes its turn on.
    assert [r["tag"] for _, r in balanced_subset(records, 3)] == list(CATEGORIES[:3])
    many = balanced_subset(records, 100)
    assert len(many) == 100 and sum(r["tag"] == "single_object" for _, r in many) == 5
    assert balanced_subset(records, None) == list(enumerate(records))
    assert balanced_subset(records, 10_000) == list(enumerate(records))


def test_batches_and_their_seeds() -> None:
    assert plan_batches([3, 1, 2], 4) == [[0, 0, 0, 1], [2, 2]]
    seeds = {batch_seed(s, b) for s in range(4) for b in range(50)}
    assert len(seeds) == 200  # seed s batch b+1 is not seed s+1 batch b
    assert batch_seed(0, 0) == batch_seed(0, 0)


def test_aggregate_uses_sample_std() -> None:
    def summary(acc: float) -> dict:
        return {"overall": acc, "categories": {"counting": {"accuracy": acc, "images": 4}}}

    agg = aggregate_seeds({0: summary(0.5), 1: summary(0.7), 2: summary(0.9)})
    assert agg["overall"]["mean"] == pytest.approx(0.7) and agg["overall"]["std"] == pytest.approx(0.2)
    assert agg["missing_categories"] == [t for t in CATEGORIES if t != "counting"]
    assert aggregate_seeds({5: summary(0.3)})["overall"]["std"] == 0.0


# ---------------------------------------------------------------------------------------------- errors


def _one_line_error(code: int, stderr: str) -> str:
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--seeds", "0,a"], "--seeds must be comma-separated integers >= 0"),
        (["--seeds", "-1"], "--seeds must be comma-separated integers >= 0"),
        (["--seeds", "1,1"], "--seeds repeats a seed"),
        (["--seeds", ""], "--seeds must be"),
        (["--max-prompts", "0"], "--max-prompts must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["--self-check-accept", "0.5"], "--self-check-accept needs --self-check K"),
        (["--self-check", "2", "--self-check-accept", "0"], "must be a probability in (0, 1]"),
    ],
)
def test_geneval_bad_options(model_dir: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    code, _, stderr = _main(eval_geneval, ["--model", str(model_dir), "--out", str(tmp_path / "o"), *extra])
    assert needle in _one_line_error(code, stderr)


def test_geneval_model_and_output_errors(model_dir: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "o")]
    code, _, stderr = _main(eval_geneval, ["--model", str(tmp_path / "missing"), *out])
    assert "model folder" in _one_line_error(code, stderr) and "does not exist" in stderr
    code, _, stderr = _main(eval_geneval, ["--model", str(model_dir)])
    assert "--model needs --out" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_geneval, [*out])
    assert "give --model PATH" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_geneval, ["--samples", str(tmp_path), "--model", str(model_dir), *out])
    assert "not both" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_geneval, ["--samples", str(tmp_path), "--seeds", "0,1"])
    assert "--seeds goes with --model" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_geneval, ["--samples", str(tmp_path), "--cfg-interval", "0,0.5"])
    assert "--cfg-interval goes with --model" in _one_line_error(code, stderr)
    fresh = tmp_path / "fresh"
    code, _, stderr = _main(
        eval_geneval, ["--model", str(model_dir), "--out", str(fresh), "--cfg-interval", "0.5"]
    )
    assert "--cfg-interval takes MIN,MAX" in _one_line_error(code, stderr)
    assert not fresh.exists()  # refused before anything is written
    (tmp_path / "file").write_text("")
    code, _, stderr = _main(eval_geneval, ["--model", str(model_dir), "--out", str(tmp_path / "file")])
    assert "is a file" in _one_line_error(code, stderr)
    # A folder that already holds a seed's samples is refused before any sampling.
    (tmp_path / "used" / "seed_1" / "00000").mkdir(parents=True)
    code, _, stderr = _main(
        eval_geneval, ["--model", str(model_dir), "--out", str(tmp_path / "used"), "--seeds", "0,1"]
    )
    assert "seed_1 already holds samples" in _one_line_error(code, stderr)
    assert not (tmp_path / "used" / "seed_0").exists()
    code, _, stderr = _main(
        eval_geneval,
        ["--model", str(model_dir), "--out", str(tmp_path / "used"), "--seeds", "0,1", "--resume"],
    )
    assert "no geneval_run.json: cannot check it is the same run" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_geneval, ["--samples", str(tmp_path), "--resume"])
    assert "--resume goes with --model" in _one_line_error(code, stderr)


def test_vqa_model_errors(model_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = _main(eval_vqa, ["--model", str(tmp_path / "missing")])
    assert "does not exist" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_vqa, ["--model", str(model_dir), "--answers", str(tmp_path / "a.jsonl")])
    assert "drop --answers" in _one_line_error(code, stderr)
    code, _, stderr = _main(eval_vqa, ["--model", str(model_dir), "--n-questions", "0"])
    assert "--n-questions must be >= 1" in _one_line_error(code, stderr)
