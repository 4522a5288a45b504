"""The design study (`blip3o study`): one training step of each variant, the diversity and CLIP-FD metrics on
known inputs, the time-budget stop of train_stage, the findings' rules, and a tiny end-to-end study that
writes its report and resumes. Everything runs on untrained miniatures: these tests check mechanics, not
the paper's numbers."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o.eval.diversity import mean_pairwise_cosine_distance, sample_diversity
from blip3o.eval.frechet import clip_frechet_distance
from blip3o.models.blip3o import Blip3o
from blip3o.study.config import VARIANTS, StudyConfig, StudyError
from blip3o.study.findings import compare, decide_findings
from blip3o.study.variants import budgeted_stage, fresh_variant_model, run_config, tokens_per_image
from blip3o.train.data import ensure_shards, load_shards
from blip3o.train.loop import train_stage
from blip3o.train.optim import build_optimizer
from blip3o.train.parallelize import init_distributed
from blip3o.train.stages import StageModule, fit_vae_scaling, parameters_of, set_trainable
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from conftest import save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "model"
    save_untrained_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    ensure_shards(folder, 16, seed=0, is_main=True)
    return folder


def _config(base_dir: Path, **overrides) -> StudyConfig:
    return replace(StudyConfig(budget_minutes=1.0, base=str(base_dir), vae_preset="micro"), **overrides)


def _renders(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [render(sample_scene(rng)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- variants


def test_one_training_step_of_each_variant(base_dir: Path, shards: Path) -> None:
    from blip3o.train.data import make_batch

    examples, _ = load_shards(shards)
    config = _config(base_dir)
    queries = {}
    for name, spec in VARIANTS.items():
        model = fresh_variant_model(Blip3o.from_pretrained(base_dir), name, config)
        assert model.config.objective == spec.objective and model.config.target == spec.target
        if model.vae is not None:
            fit_vae_scaling(model, [e.image for e in examples[:8]])
        queries[name] = model.backbone.latent_queries.detach().clone()
        stage = budgeted_stage(name, config)
        set_trainable(model, stage.kind)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        batch = make_batch(stage.kind, examples, [0, 1], [0, 1], 0, 0.1, qa_share=stage.qa_share)
        loss, _ = StageModule(model, stage.kind, stage.understanding_weight)(batch)
        loss.backward()
        build_optimizer(parameters_of(model), 1e-3, 0.0).step()
        changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
        assert torch.isfinite(loss)
        # Queries and DiT train in every variant; only joint trains (and moves) the backbone's VLM. (The DiT
        # starts as the zero map, so one step moves only its output layer: the queries get no gradient yet.)
        assert "backbone.latent_queries" in before and any(n.startswith("dit.") for n in changed)
        assert any(n.startswith("backbone.vlm.") for n in before) == (name == "joint")
        assert any(n.startswith("backbone.vlm.") for n in changed) == (name == "joint")
        assert not any(n.startswith(("clip.", "decoder.", "vae.")) for n in before)
        assert tokens_per_image(model) == (256 if name == "vae_fm" else 64)
    # The same fresh queries in every variant (one seed), none inherited from the base.
    base_queries = Blip3o.from_pretrained(base_dir).backbone.latent_queries
    assert all(torch.equal(q, queries["clip_fm"]) for q in queries.values())
    assert not torch.equal(queries["clip_fm"], base_queries)


def test_study_config_rejects_bad_settings(base_dir: Path) -> None:
    with pytest.raises(StudyError, match="budget"):
        _config(base_dir, budget_minutes=0)
    with pytest.raises(StudyError, match="unknown variant"):
        _config(base_dir, variants=("clip_fm", "dalle"))
    with pytest.raises(StudyError, match="points"):
        _config(base_dir, points=0)


# ---------------------------------------------------------------------------------------------- metrics


def test_diversity_of_known_features() -> None:
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(8, 1)
    assert mean_pairwise_cosine_distance(same) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine_distance(torch.randn(8, 16, generator=torch.Generator().manual_seed(0))) > 0.5
    # By hand: pairs (e1, e2) -> 1, (e1, -e1) -> 2, (e2, -e1) -> 1; the mean is 4/3.
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine_distance(three) == pytest.approx(4 / 3)
    # Scale does not matter (cosine), only direction.
    assert mean_pairwise_cosine_distance(three * 5) == pytest.approx(4 / 3)


def test_mse_samples_have_zero_target_diversity(base_dir: Path) -> None:
    config = _config(base_dir)
    base = Blip3o.from_pretrained(base_dir)
    clip = base.clip
    mse = fresh_variant_model(base, "clip_mse", config)
    result = sample_diversity(mse, clip, ["a red circle"], n=3, steps=2, decoder_steps=2)
    assert result["target"] == pytest.approx(0.0, abs=1e-9)  # one deterministic prediction per prompt
    assert result["image"] >= 0.0 and set(result["per_prompt"]) == {"a red circle"}


def test_clip_frechet_distance_identical_and_shifted_sets(base_dir: Path) -> None:
    clip = Blip3o.from_pretrained(base_dir).clip
    real = _renders(48)
    assert clip_frechet_distance(clip, real, list(real)) == pytest.approx(0.0, abs=1e-3)
    # The same scenes with darkened colours: another distribution, a clearly positive distance.
    dark = [Image.fromarray((np.asarray(im) // 3).astype(np.uint8)) for im in real]
    assert clip_frechet_distance(clip, real, dark) > 0.05
    # The custom extractor keeps torchmetrics off its Inception path (torch-fidelity is not installed).
    assert "torch_fidelity" not in sys.modules


# ------------------------------------------------------------------------------------- time budget


def test_stop_after_s_checkpoints_exports_and_resumes(base_dir: Path, shards: Path, tmp_path: Path) -> None:
    examples, _ = load_shards(shards)
    config = _config(base_dir, batch_size=4)
    base = Blip3o.from_pretrained(base_dir)
    stage = replace(budgeted_stage("clip_fm", config), ema_decay=0.9)
    run = run_config(base, stage, config, str(shards))
    dist = init_distributed("cpu")
    first = train_stage(base, stage, 2, run, tmp_path, examples, dist, None, progress=False, stop_after_s=0)
    assert (first.end_step, first.steps_run) == (1, 1) and first.train_s > 0
    assert (tmp_path / stage.name / "checkpoints" / "step_00000001").is_dir()
    exported = Blip3o.from_pretrained(first.model_dir)  # a usable release folder
    assert exported.generate(["a red circle"], steps=1, decoder_steps=1)[0].size == (64, 64)
    second = train_stage(
        Blip3o.from_pretrained(base_dir), stage, 2, run, tmp_path, examples, dist, None, progress=False,
        stop_after_s=0,
    )  # fmt: skip
    assert (second.end_step, second.steps_run) == (2, 1)  # resumed from the stop's checkpoint
    summary = json.loads((tmp_path / stage.name / "stage_summary.json").read_text())
    assert summary["end_step"] == 2 and summary["resumed_at"] == 1


# ---------------------------------------------------------------------------------------------- findings


def _point(
    geneval: float, diversity: float, vqa: float, fd: float = 1.0, images: int = 120, clip: float = 0.3
) -> dict:
    return {
        "point": 1, "step": 10, "train_s": 60.0, "samples_per_s": 10.0,
        "geneval": {"overall": geneval, "categories": {}, "images": images},
        "diversity": {"image": diversity, "target": diversity}, "frechet_clip": fd,
        "clip_score": {"mean": clip, "std": 0.1, "n": images},
        "vqa": {"overall": vqa, "per_kind": {}, "n": 300},
    }  # fmt: skip


def test_findings_rules() -> None:
    assert compare(0.5, 0.2, 120) == 1 and compare(0.2, 0.5, 120) == -1 and compare(0.0, 0.0, 120) == 0
    variants = {
        "clip_fm": {"points": [_point(0.6, 0.3, 0.55)], "tokens_per_image": 64},
        "clip_mse": {"points": [_point(0.2, 0.05, 0.55)], "tokens_per_image": 64},
        "vae_fm": {"points": [_point(0.1, 0.3, 0.55, fd=0.2)], "tokens_per_image": 256},
        "joint": {"points": [_point(0.5, 0.3, 0.40)], "tokens_per_image": 64},
    }
    verdicts = [f.verdict for f in decide_findings({"base": {"vqa": 0.55}, "variants": variants})]
    assert verdicts == ["yes", "yes", "yes", "yes", "yes"]
    # GenEval 0 everywhere: the CLIP score decides where it separates the variants, else inconclusive.
    zero = {name: {"points": [_point(0.0, 0.3, 0.55)], "tokens_per_image": 64} for name in variants}
    verdicts = [f.verdict for f in decide_findings({"base": {"vqa": 0.55}, "variants": zero})]
    assert verdicts[0] == verdicts[2] == "inconclusive" and verdicts[3] == "no"
    zero["clip_fm"]["points"] = [_point(0.0, 0.3, 0.55, clip=0.4)]  # margin 2 * sqrt(2 * 0.01 / 120) = 0.026
    verdicts = [f.verdict for f in decide_findings({"base": {"vqa": 0.55}, "variants": zero})]
    assert verdicts[0] == verdicts[2] == "yes"
    assert decide_findings({"base": {}, "variants": {}})[0].verdict == "not run"


def test_report_appends_a_hand_written_analysis_under_its_own_heading(tmp_path: Path) -> None:
    from blip3o.study.report import ANALYSIS_FILE, write_report

    point = {**_point(0.0, 0.3, 0.55), "generation_images_per_s": 2.0, "loss": 0.5}
    variants = {"clip_fm": {"label": "CLIP + FM", "points": [point], "tokens_per_image": 64}}
    results = json.loads(json.dumps({"commands": ["blip3o study --budget-minutes 1 --out x"], "base": {"vqa": 0.55},
                                     "variants": variants}))  # fmt: skip
    results["settings"] = StudyConfig(budget_minutes=1.0, base="b").to_dict()
    results["environment"], results["started"] = (
        {"threads": 1, "cpus": 1, "machine": "x", "torch": "t"},
        "now",
    )
    write_report(tmp_path, results)
    assert "Analysis (written by hand" not in (tmp_path / "report.md").read_text()
    (tmp_path / ANALYSIS_FILE).write_text("GenEval is 0 because the DiT draws no objects.\n")
    report = write_report(tmp_path, results).read_text()
    head, analysis = report.split("## Analysis (written by hand after the run, not generated)")
    assert "reproduced: **" in head and analysis.strip() == "GenEval is 0 because the DiT draws no objects."


# ------------------------------------------------------------------------------------------ end to end


def test_tiny_study_writes_report_and_resumes(base_dir: Path, shards: Path, tmp_path: Path) -> None:
    from blip3o.cli.study import main

    out = tmp_path / "study"
    args = [
        "--budget-minutes", "0.02", "--out", str(out), "--base", str(base_dir), "--shards", str(shards),
        "--points", "2", "--vae-minutes", "0.01", "--vae-preset", "micro", "--geneval-prompts", "6",
        "--images-per-prompt", "1", "--vqa-questions", "8", "--diversity-prompts", "1", "--sample-steps", "2",
        "--decoder-steps", "2", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == list(VARIANTS)
    for name, state in results["variants"].items():
        points = state["points"]
        assert len(points) == 2 and state["pending"] is None
        assert points[1]["step"] > points[0]["step"] >= 1
        assert 0.0 <= points[-1]["geneval"]["overall"] <= 1.0 and points[-1]["frechet_clip"] >= 0.0
        assert points[-1]["vqa"]["n"] == 8, name
    assert results["variants"]["vae_fm"]["vae_stage"]["steps"] >= 1
    report = (out / "report.md").read_text()
    assert "blip3o study --budget-minutes 0.02" in report and report.count("reproduced: **") == 5
    assert "NOT Inception-FID" in report
    assert 0 < results["variants"]["clip_fm"]["points"][-1]["clip_score"]["n"] == 6
    assert "samples.png" in report
    for png in (
        "samples.png",
        "geneval_vs_step.png",
        "geneval_vs_time.png",
        "diversity_vs_time.png",
        "vqa_vs_time.png",
    ):
        assert (out / png).stat().st_size > 0
    # The same command again: everything is measured already, nothing changes.
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["variants"] == results["variants"]
    # Other settings in the same folder: a clear error, not a mixed study.
    changed = [a if a != "0.02" else "0.03" for a in args]
    assert main(changed) == 2
    assert main(["--budget-minutes", "0", "--out", str(tmp_path / "x"), "--base", str(base_dir)]) == 2
