"""bench/self_distill.py: the accepted-sample buffer, the guided target, and the fine-tune's control path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.transport import FlowMatchingConfig
from blip3o.world.prompts import load_train_prompts
from blip3o.world.scene import SHAPES
from conftest import changed_parts, load_script, tiny_object_label_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "self_distill.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def object_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("object") / "model"
    tiny_object_label_model().save_pretrained(folder)
    return folder


def test_record_shape_counts_follow_the_prompt(bench) -> None:
    record = {
        "include": [{"class": "star", "count": 3, "color": "red"}],
        "exclude": [{"class": "star", "count": 4}],
    }
    counts = bench.record_shape_counts(record)
    assert counts[SHAPES.index("star")] == 3 and counts.sum() == 3
    pair = {"include": [{"class": "circle", "count": 1}, {"class": "circle", "count": 1}], "exclude": []}
    assert bench.record_shape_counts(pair)[SHAPES.index("circle")] == 2


def test_guided_target_makes_the_guided_velocity_meet_the_flow_target(bench) -> None:
    """For accepted rows, v_u + w (v_c* - v_u) equals noise - x0 at the regression target v_c*; a model whose
    conditional velocity sits there has zero loss on those rows."""
    torch.manual_seed(0)
    flow = FlowMatchingConfig(cfg_scale=3.0)
    batch, n_buffer = 4, 2
    v_uncond = torch.randn(batch, 2, 3, 3)
    plain = torch.randn(batch, 2, 3, 3)  # noise - x0

    class Dit:
        def __call__(self, x, t, c):
            return v_uncond[: x.shape[0]]  # the rows asked for are the first ones (the accepted rows)

    class Model:
        dit = Dit()

    aux = {"target": plain, "x_t": torch.zeros(batch, 2, 3, 3), "timestep": torch.full((batch,), 500.0),
           "sigma": torch.full((batch,), 0.5)}  # fmt: skip
    keep = torch.ones(batch, dtype=torch.bool)
    v_star = plain.clone()
    v_star[:n_buffer] = v_uncond[:n_buffer] + (plain[:n_buffer] - v_uncond[:n_buffer]) / 3.0
    cond = torch.zeros(batch, 5, 7)
    loss = bench.guided_buffer_loss(Model(), aux, v_star, cond, keep, n_buffer, flow)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    guided = v_uncond[:n_buffer] + 3.0 * (v_star[:n_buffer] - v_uncond[:n_buffer])
    torch.testing.assert_close(guided, plain[:n_buffer])
    # The plain target on those rows is not met by v_star: the loss sees the difference.
    assert bench.guided_buffer_loss(Model(), aux, plain, cond, keep, n_buffer, flow).item() > 0.01


def test_buffer_counts_every_try_and_keeps_only_passing_samples(bench, object_model: Path) -> None:
    model = Blip3o.from_pretrained(object_model).eval()
    records = load_train_prompts()
    singles = sum(r["tag"] == "single_object" for r in records)
    targets, index, rates = bench.build_buffer(
        model, records, {"single_object": 2}, "tokens", seed=0, batch=8, steps=2
    )
    assert rates["single_object"]["tried"] == 2 * singles and set(rates) == {"single_object"}
    assert rates["single_object"]["kept"] == len(index) == targets.shape[0]
    assert targets.shape[1:] == tuple(model.config.target_shape)
    assert all(records[i]["tag"] == "single_object" for i in index)


def test_control_fine_tune_changes_only_what_an_instruct_stage_trains(
    bench, object_model: Path, tmp_path
) -> None:
    out = tmp_path / "control"
    report = bench.main([str(object_model), "--out", str(out), "--share", "0", "--steps", "2", "--batch-size", "2",
                         "--threads", "1", "--real-prompts", "8"])  # fmt: skip
    assert [row["step"] for row in report["log"]] == [0, 1]
    assert json.loads((out / "report.json").read_text())["args"]["share"] == "0.0"
    before, after = Blip3o.from_pretrained(object_model), Blip3o.from_pretrained(out / "model")
    changed = changed_parts(before, after)
    assert changed and changed <= {"dit", "backbone.latent_queries"}
