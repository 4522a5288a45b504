"""tools/deepen_dit.py and blip3o.models.dit_depth: a deeper DiT whose inserted layers start as the identity (same
samples as before)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.models.dit_depth import deepen
from blip3o.train.config import ConfigError, RunConfig
from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import preset
from conftest import load_script, save_moved_tiny_test_model

TOOL = Path(__file__).resolve().parents[1] / "tools" / "deepen_dit.py"
PROMPTS = ["a photo of two stars", "a photo of a red circle left of a blue square"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float16 tiny-test model whose every weight moved off its initial value (so its adaLN gates are open)."""
    return save_moved_tiny_test_model(tmp_path_factory.mktemp("source") / "model")


def _samples(model: Blip3o) -> torch.Tensor:
    with torch.no_grad():
        return model.generate_target(
            PROMPTS, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)
        )


def test_the_deeper_model_samples_exactly_as_the_source(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "deeper"
    assert load_script(TOOL).main([str(source), str(out), "--copy", "0", "1"]) == 0
    before, after = Blip3o.from_pretrained(source), Blip3o.from_pretrained(out)
    layers = before.config.dit.n_layers
    assert after.config.dit.n_layers == layers + 2
    assert json.loads((out / "dit" / "config.json").read_text())["n_layers"] == layers + 2
    assert json.loads((out / "config.json").read_text())["storage_dtype"] == "float16"
    assert torch.equal(_samples(before), _samples(after))
    # The copies start from their layer's weights, all but the gate rows; the old layers moved up by one each.
    old, new = before.dit.state_dict(), after.dit.state_dict()
    assert torch.equal(
        new["model.layers.1.feed_forward.linear_1.weight"], old["model.layers.0.feed_forward.linear_1.weight"]
    )
    assert torch.equal(new["model.layers.2.attn1.to_q.weight"], old["model.layers.1.attn1.to_q.weight"])
    gates = new["model.layers.1.norm1.linear.weight"].chunk(4)  # scale_attn, gate_attn, scale_ffn, gate_ffn
    assert not gates[1].any() and not gates[3].any()
    assert torch.equal(gates[0], old["model.layers.0.norm1.linear.weight"].chunk(4)[0])
    # Backbone, CLIP and decoder are the source's.
    for part in ("backbone", "clip", "decoder"):
        for name, value in getattr(before, part).state_dict().items():
            assert torch.equal(value, getattr(after, part).state_dict()[name]), f"{part}.{name}"


def test_an_int8_dit_stays_int8(tmp_path: Path, source: Path) -> None:
    int8_source = tmp_path / "int8"
    Blip3o.from_pretrained(source).save_pretrained(int8_source, dtype=torch.float16, dit_int8=True)
    out = tmp_path / "deeper"
    assert load_script(TOOL).main([str(int8_source), str(out), "--copy", "0"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dit_storage"] == "int8" and config["storage_dtype"] == "float16"
    # int8 again from int8 values: each row's largest weight is 127 steps, so the steps (and samples) stay.
    before, after = _samples(Blip3o.from_pretrained(int8_source)), _samples(Blip3o.from_pretrained(out))
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()


def test_the_copies_train(source: Path) -> None:
    """Zero gates still pass a gradient to the gate rows, so training can open the inserted layers."""
    deeper = deepen(Blip3o.from_pretrained(source), [0]).train()
    x = torch.randn(2, *deeper.config.target_shape)
    cond = deeper.condition(PROMPTS).float()
    deeper.dit(x, torch.tensor([500.0, 500.0]), cond).square().mean().backward()
    grad = deeper.dit.model.layers[1].norm1.linear.weight.grad.chunk(4)
    assert grad[1].abs().sum() > 0 and grad[3].abs().sum() > 0


@pytest.mark.parametrize("copies", [["7"], ["0", "0"], ["-1"]])
def test_bad_layers_are_refused(tmp_path: Path, source: Path, copies: list[str], capsys) -> None:
    assert load_script(TOOL).main([str(source), str(tmp_path / "out"), "--copy", *copies]) == 2
    assert "layer copies must be distinct layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused(tmp_path: Path, source: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert load_script(TOOL).main([str(source), str(out), "--copy", "0"]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_stage_deepens_the_dit_it_receives(tmp_path: Path) -> None:
    """`deepen_dit_after` on a stage: its model (and every later stage's) has the copies; with lr 0 that
    stage's export samples exactly as the stage before it; a rerun accepts the finished deeper stage."""
    from blip3o.train.loop import run

    base = preset("tiny-gen")
    first = dataclasses.replace(base.stages[0], steps=2)
    deeper = dataclasses.replace(first, name="deeper", lr=0.0, deepen_dit_after=(0,))
    config = dataclasses.replace(base, stages=(first, deeper), deterministic=False)
    layers = config.model.dit.n_layers
    assert config.stage_model("generation").dit.n_layers == layers
    assert config.stage_model("deeper").dit.n_layers == layers + 1
    run(config, tmp_path, progress=False)
    before = Blip3o.from_pretrained(tmp_path / "generation" / "model")
    after = Blip3o.from_pretrained(tmp_path / "deeper" / "model")
    assert (before.config.dit.n_layers, after.config.dit.n_layers) == (layers, layers + 1)
    assert torch.equal(_samples(before), _samples(after))
    assert run(config, tmp_path, progress=False) == []  # both stages found finished and of the right model


def test_deepen_dit_after_is_checked_and_overridable() -> None:
    config = preset("tiny-gen")
    layers = config.model.dit.n_layers
    deeper = apply_overrides(config, ["stages.generation.deepen_dit_after=0,1"])
    assert deeper.stage("generation").deepen_dit_after == (0, 1)
    assert RunConfig.from_dict(json.loads(deeper.to_json())) == deeper
    for bad in (f"{layers}", "0,0", "-1"):
        with pytest.raises(ConfigError, match="deepen_dit_after takes distinct DiT layers"):
            apply_overrides(config, [f"stages.generation.deepen_dit_after={bad}"])
