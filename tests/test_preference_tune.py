"""bench/preference_tune.py: the pairs, the Diffusion-DPO loss, and the fine-tune's path."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blip3o.models.blip3o import Blip3o
from blip3o.world.prompts import load_train_prompts
from conftest import changed_parts, load_script, tiny_object_label_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "preference_tune.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def object_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("object") / "model"
    tiny_object_label_model().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("guided", [False, True])
def test_dpo_loss_is_log_two_where_the_model_is_its_reference(
    bench, object_model: Path, guided: bool
) -> None:
    model = Blip3o.from_pretrained(object_model).eval()
    ref = copy.deepcopy(model)
    shape = (3, *model.config.target_shape)
    wins, losses = torch.randn(shape), torch.randn(shape)
    prompts = ["a photo of two stars"] * 3
    generator = torch.Generator().manual_seed(0)
    loss, accuracy, d = bench.dpo_loss(
        model, ref, wins, losses, prompts, 2000.0, generator, model.config.flow, guided
    )
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6) and d == 0.0 and accuracy == 0.0
    # A model nudged away from its reference: d moves off zero and the loss with it.
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _, d = bench.dpo_loss(
        model, ref, wins, losses, prompts, 2000.0, torch.Generator().manual_seed(0), model.config.flow, guided
    )
    assert d != 0.0 and loss.item() != pytest.approx(math.log(2.0), abs=1e-6)


def test_pairs_hold_a_passing_and_a_failing_sample_of_one_prompt(
    bench, object_model: Path, monkeypatch
) -> None:
    """With verdicts alternating pass / fail, each prompt's passing samples are the wins, its failing ones the losses,
    one pair per (pass, fail), and every try is counted."""
    model = Blip3o.from_pretrained(object_model).eval()
    records = load_train_prompts()
    singles = [i for i, r in enumerate(records) if r["tag"] == "single_object"]

    def alternate(part, detections):
        return [k % 2 == 0 for k in range(len(part))]

    monkeypatch.setattr(bench, "detection_verdicts", alternate)
    recorded = []
    real_generate = model.generate_target

    def generate(prompts, **kwargs):
        out = real_generate(prompts, steps=2, **kwargs)  # two sampler steps: the verdicts are stubbed
        recorded.append(out)
        return out

    monkeypatch.setattr(model, "generate_target", generate)
    wins, losses, index, rates, by_tag = bench.sample_pairs(
        model, records, {"single_object": 2}, seed=0, batch=2
    )
    assert rates == {"single_object": {"tried": 2 * len(singles), "passed": len(singles)}}
    assert index == singles and by_tag == {"single_object": len(singles)}
    samples = torch.cat(recorded)  # (2 S, C, g, g): each prompt twice in a row, pass then fail
    torch.testing.assert_close(wins, samples[0::2].float())
    torch.testing.assert_close(losses, samples[1::2].float())


def test_fine_tune_changes_only_what_an_instruct_stage_trains(bench, object_model: Path, tmp_path) -> None:
    model = Blip3o.from_pretrained(object_model)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    shape = (4, *model.config.target_shape)
    save_file({"wins": torch.randn(shape), "losses": torch.randn(shape)}, pairs / "pairs.safetensors")
    records = load_train_prompts()
    index = [i for i, r in enumerate(records) if r["tag"] == "counting"][:4]
    meta = {"index": index, "rates": {"counting": {"tried": 8, "passed": 4}}, "pairs": {"counting": 4}}
    (pairs / "pairs.json").write_text(json.dumps(meta))
    out = tmp_path / "tuned"
    report = bench.main([str(object_model), "--out", str(out), "--pairs-from", str(pairs), "--steps", "2",
                         "--pairs", "2", "--real", "2", "--real-prompts", "8", "--threads", "1"])  # fmt: skip
    assert [row["step"] for row in report["log"]] == [0, 1] and "flow" in report["log"][0]
    after = Blip3o.from_pretrained(out / "model")
    changed = changed_parts(model, after)
    assert changed and changed <= {"dit", "backbone.latent_queries"}
