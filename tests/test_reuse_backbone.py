"""tools/reuse_backbone.py: a run's understanding stages filled from another model's backbone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from blip3o.models.blip3o import Blip3o, tiny_config
from conftest import load_script

TOOL = Path(__file__).resolve().parents[1] / "tools" / "reuse_backbone.py"


def _load_tool():
    return load_script(TOOL)


def test_backbone_is_taken_from_the_source_and_queries_stay(tmp_path: Path) -> None:
    config = tiny_config(tokenizer_corpus_scenes=100)
    # The same seed gives the same tokenizer (as in a real run); then every weight of `own` is moved.
    source, own = Blip3o.from_config(config, seed=1), Blip3o.from_config(config, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in own.parameters():
            p.add_(0.01 * torch.randn_like(p))
    source.save_pretrained(tmp_path / "source")
    own.save_pretrained(tmp_path / "run" / "decoder" / "model")
    assert _load_tool().main([str(tmp_path / "source"), str(tmp_path / "run")]) == 0
    for stage in ("vision", "understanding"):
        filled = Blip3o.from_pretrained(tmp_path / "run" / stage / "model")
        for name, value in filled.backbone.state_dict().items():
            expected = (own if name == "latent_queries" else source).backbone.state_dict()[name]
            assert torch.equal(value, expected), name
        # Everything else is the run's own.
        assert all(torch.equal(v, own.dit.state_dict()[k]) for k, v in filled.dit.state_dict().items())
        assert all(torch.equal(v, own.clip.state_dict()[k]) for k, v in filled.clip.state_dict().items())


def test_refuses_a_different_backbone_config(tmp_path: Path) -> None:
    config = tiny_config(tokenizer_corpus_scenes=100)
    other = replace(config, backbone=replace(config.backbone, n_queries=32))
    Blip3o.from_config(other, seed=1).save_pretrained(tmp_path / "source")
    Blip3o.from_config(config, seed=1).save_pretrained(tmp_path / "run" / "decoder" / "model")
    assert _load_tool().main([str(tmp_path / "source"), str(tmp_path / "run")]) == 1
    assert not (tmp_path / "run" / "vision").exists()


def test_provenance_and_curves_are_recorded(tmp_path: Path) -> None:
    config = tiny_config(tokenizer_corpus_scenes=100)
    Blip3o.from_config(config, seed=1).save_pretrained(tmp_path / "source")
    Blip3o.from_config(config, seed=1).save_pretrained(tmp_path / "run" / "decoder" / "model")
    curves = tmp_path / "curves.csv"
    curves.write_text(
        "stage,step,loss,grad_norm,lr,samples_per_s\n"
        "vision,50,1.5,2.0,0.001,800\nvision,100,0.9,1.0,0.001,810\nunderstanding,50,4.0,3.0,0.001,130\n"
    )
    args = [str(tmp_path / "source"), str(tmp_path / "run"), "--curves", str(curves)]
    assert _load_tool().main(args) == 0
    vision = [
        json.loads(line) for line in (tmp_path / "run" / "vision" / "log.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r["loss"]) for r in vision] == [(50, 1.5), (100, 0.9)]
    reused = json.loads((tmp_path / "run" / "understanding" / "reused.json").read_text())
    assert reused["source"] == str(tmp_path / "source") and reused["log"] == f"copied from {curves}"
    # A curves file without a filled stage's rows is refused before anything is written.
    assert _load_tool().main([*args, "--stages", "vision", "extra"]) == 1
    assert not (tmp_path / "run" / "extra").exists()
