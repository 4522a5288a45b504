"""tools/reuse_target.py: a run's CLIP and decoder stages filled from another model's CLIP and decoder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from blip3o.models.blip3o import Blip3o
from blip3o.train.presets import preset
from conftest import load_script

TOOL = Path(__file__).resolve().parents[1] / "tools" / "reuse_target.py"


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_clip_and_decoder_come_from_the_source_the_rest_is_the_runs_fresh_start(tmp_path: Path) -> None:
    run = preset("tiny-test")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(run.to_json())
    source = Blip3o.from_config(run.model, run.seed)
    torch.manual_seed(0)
    with torch.no_grad():  # trained stand-ins: every weight moved
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    source.save_pretrained(tmp_path / "source")
    assert load_script(TOOL).main([str(tmp_path / "source"), str(tmp_path / "run")]) == 0
    fresh, saved = Blip3o.from_config(run.model, run.seed), Blip3o.from_pretrained(tmp_path / "source")
    for stage in ("clip", "decoder"):
        filled = Blip3o.from_pretrained(tmp_path / "run" / stage / "model")
        assert _equal_states(filled.clip, saved.clip) and _equal_states(filled.decoder, saved.decoder)
        assert _equal_states(filled.backbone, fresh.backbone) and _equal_states(filled.dit, fresh.dit)
        assert not _equal_states(filled.dit, saved.dit)


def test_filled_stages_say_where_they_came_from_and_carry_the_sources_curves(tmp_path: Path) -> None:
    run = preset("tiny-test")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(run.to_json())
    Blip3o.from_config(run.model, run.seed).save_pretrained(tmp_path / "source")
    curves = tmp_path / "curves.csv"
    curves.write_text(
        "stage,step,loss,grad_norm,lr,samples_per_s\n"
        "clip,50,7.5,2.0,0.001,90\nclip,100,4.5,1.0,0.001,91\ndecoder,50,0.1,0.5,0.001,30\n"
    )
    tool = load_script(TOOL)
    args = [
        str(tmp_path / "source"),
        str(tmp_path / "run"),
        "--source-note",
        "a test",
        "--curves",
        str(curves),
    ]
    assert tool.main(args) == 0
    for stage, steps in (("clip", [50, 100]), ("decoder", [50])):
        reused = json.loads((tmp_path / "run" / stage / "reused.json").read_text())
        assert reused == {
            "source": f"{tmp_path / 'source'} (a test)",
            "tool": "tools/reuse_target.py",
            "weights": "clip, decoder",
            "log": f"copied from {curves}",
        }
        log = [json.loads(line) for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == steps
    # Curves without a filled stage's rows: refused before anything is written.
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "config.json").write_text(run.to_json())
    curves.write_text("stage,step,loss,grad_norm,lr,samples_per_s\nclip,50,7.5,2.0,0.001,90\n")
    assert tool.main([str(tmp_path / "source"), str(tmp_path / "run2"), "--curves", str(curves)]) == 1
    assert not (tmp_path / "run2" / "clip").exists()


def test_refuses_a_different_decoder_or_a_missing_run_config(tmp_path: Path) -> None:
    run = preset("tiny-test")
    other = replace(
        run.model, decoder=replace(run.model.decoder, sample_steps=run.model.decoder.sample_steps + 1)
    )
    Blip3o.from_config(other, run.seed).save_pretrained(tmp_path / "source")
    tool = load_script(TOOL)
    assert tool.main([str(tmp_path / "source"), str(tmp_path / "run")]) == 1  # no config.json yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(run.to_json())
    assert tool.main([str(tmp_path / "source"), str(tmp_path / "run")]) == 1
    assert not (tmp_path / "run" / "clip").exists()
