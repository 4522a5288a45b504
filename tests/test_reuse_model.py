"""tools/reuse_model.py: a run's first stages filled with a whole trained model, so training goes on from it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.train.loop import check_stage_model
from blip3o.train.presets import preset
from conftest import load_script, save_moved_tiny_test_model

TOOL = Path(__file__).resolve().parents[1] / "tools" / "reuse_model.py"
STAGES = ["clip", "decoder", "vision", "understanding", "generation"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float16 model of the tiny-test run's config, every weight moved off its initial value."""
    return save_moved_tiny_test_model(tmp_path_factory.mktemp("source") / "model")


def _run_folder(tmp_path: Path, config=None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((config or preset("tiny-test")).to_json())
    return run


def test_every_weight_comes_from_the_source_in_float32(tmp_path: Path, source: Path) -> None:
    run = _run_folder(tmp_path)
    assert (
        load_script(TOOL).main([str(source), str(run), "--stages", *STAGES, "--source-note", "a test"]) == 0
    )
    expected = Blip3o.from_pretrained(source).float().state_dict()
    for stage in STAGES:
        check_stage_model(run / stage / "model", preset("tiny-test").model)  # what `blip3o train` checks
        filled = Blip3o.from_pretrained(run / stage / "model").state_dict()
        assert filled.keys() == expected.keys()
        for name, value in filled.items():
            if value.is_floating_point():
                assert value.dtype == torch.float32, name
            assert torch.equal(value, expected[name]), name
        reused = json.loads((run / stage / "reused.json").read_text())
        assert reused == {"source": f"{source} (a test)", "tool": "tools/reuse_model.py", "weights": "all"}
    assert not (run / "instruct").exists()  # the first stage not filled is where training resumes


def test_curves_and_card_samples_are_copied_per_stage(tmp_path: Path, source: Path) -> None:
    run = _run_folder(tmp_path)
    curves = tmp_path / "curves.csv"
    curves.write_text(
        "stage,step,loss,grad_norm,lr,samples_per_s\n"
        "clip,50,7.5,2.0,0.001,90\nclip,100,4.5,1.0,0.001,91\ndecoder,50,0.1,0.5,0.001,30\n"
    )
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("decoder_step_000050.png", "decoder_extra_step_000050.png", "clip_grid.png"):
        (samples / name).write_bytes(name.encode())
    args = [
        str(source),
        str(run),
        "--stages",
        "clip",
        "decoder",
        "--curves",
        str(curves),
        "--samples",
        str(samples),
    ]
    assert load_script(TOOL).main(args) == 0
    clip = [json.loads(line) for line in (run / "clip" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in clip] == [(50, 7.5), (100, 4.5)]
    assert json.loads((run / "decoder" / "reused.json").read_text())["log"] == f"copied from {curves}"
    # Only a stage's own step grids: not another stage's whose name starts alike, nor other pictures.
    assert sorted(p.name for p in (run / "decoder" / "samples").iterdir()) == ["step_000050.png"]
    assert (run / "decoder" / "samples" / "step_000050.png").read_bytes() == b"decoder_step_000050.png"
    assert not (run / "clip" / "samples").exists()


def test_refuses_a_source_of_another_config(tmp_path: Path, source: Path) -> None:
    base = preset("tiny-test")
    other = replace(base, model=replace(base.model, dit=replace(base.model.dit, dim=base.model.dit.dim * 2)))
    run = _run_folder(tmp_path, other)
    assert load_script(TOOL).main([str(source), str(run), "--stages", "clip"]) == 1
    assert not (run / "clip").exists()


def test_condition_word_tokens_are_given_to_the_source_without_touching_a_weight(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture
) -> None:
    base = preset("tiny-test")
    worded = replace(base.model, backbone=replace(base.model.backbone, condition_word_tokens=5))
    run = _run_folder(tmp_path, replace(base, model=worded))
    tool = load_script(TOOL)
    assert tool.main([str(source), str(run), "--stages", "clip"]) == 1  # as saved, it has none
    err = capsys.readouterr().err
    assert "condition_word_tokens 0 (run: 5)" in err
    assert "It cannot fill this run" in err and "stage folder" not in err  # advice for a source, not a stage
    assert tool.main([str(source), str(run), "--stages", "clip", "--condition-word-tokens", "5"]) == 0
    check_stage_model(run / "clip" / "model", worded)
    filled = Blip3o.from_pretrained(run / "clip" / "model")
    assert filled.config.backbone.condition_word_tokens == 5
    expected = Blip3o.from_pretrained(source).float().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in filled.state_dict().items())
    assert json.loads((run / "clip" / "reused.json").read_text())["condition_word_tokens"] == 5
    assert filled.condition(["a circle left of a star"]).shape[1] == 5 + worded.backbone.n_queries


@pytest.mark.parametrize(
    "stages", [["decoder"], ["clip", "vision"], ["clip", "nonsense"]], ids=["skips", "gap", "unknown"]
)
def test_refuses_stages_that_are_not_the_runs_first(tmp_path: Path, source: Path, stages: list[str]) -> None:
    run = _run_folder(tmp_path)
    assert load_script(TOOL).main([str(source), str(run), "--stages", *stages]) == 1
    assert not any(p.is_dir() for p in run.iterdir())


def test_refuses_a_run_without_config(tmp_path: Path, source: Path) -> None:
    assert load_script(TOOL).main([str(source), str(tmp_path), "--stages", "clip"]) == 1


def test_fresh_generation_keeps_all_but_the_dit_and_queries_which_start_as_a_new_run(
    tmp_path: Path, source: Path
) -> None:
    run = _run_folder(tmp_path)
    stages = STAGES[:-1]  # up to understanding: none of them trains the DiT
    assert load_script(TOOL).main([str(source), str(run), "--stages", *stages, "--fresh-generation"]) == 0
    config = preset("tiny-test")
    trained = Blip3o.from_pretrained(source).float().state_dict()
    new_run = Blip3o.from_config(config.model, config.seed).state_dict()  # what `blip3o train` starts from
    generation_side = ("dit.", "backbone.latent_queries")
    for stage in stages:
        filled = Blip3o.from_pretrained(run / stage / "model").state_dict()
        fresh = [name for name in filled if name.startswith(generation_side)]
        assert fresh and len(fresh) < len(filled)
        for name, value in filled.items():
            expected = new_run[name] if name.startswith(generation_side) else trained[name]
            assert torch.equal(value, expected), name
        # The source's DiT really differed, so the check above can fail.
        assert any(not torch.equal(trained[name], new_run[name]) for name in fresh)
        weights = json.loads((run / stage / "reused.json").read_text())["weights"]
        assert weights == f"all but the DiT and latent queries (fresh, seed {config.seed})"


def test_fresh_generation_refuses_stages_that_train_the_dit(tmp_path: Path, source: Path) -> None:
    run = _run_folder(tmp_path)
    assert load_script(TOOL).main([str(source), str(run), "--stages", *STAGES, "--fresh-generation"]) == 1
    assert not any(p.is_dir() for p in run.iterdir())
