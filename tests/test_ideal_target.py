"""bench/ideal_target.py: the object-centric token layout, its token judge, and a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3o.eval.model_eval import balanced_subset
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.sampler import sample_scene
from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH_DIR / "ideal_target.py")


def test_tokens_give_back_every_object(bench) -> None:
    """One detection per object, at its cell, with its shape, colour and box centre (to float rounding)."""
    rng = np.random.default_rng(0)
    for scene in [sample_scene(rng) for _ in range(100)]:
        tokens = bench.ideal_tokens(scene)
        assert tokens.shape == (bench.CHANNELS, 8, 8)
        assert int(tokens[bench.PRESENCE].sum()) == len(scene.objects)  # no two centres share a cell
        found = sorted(bench.token_detections(tokens), key=lambda d: d.box)
        for obj, det in zip(sorted(scene.objects, key=lambda o: o.box), found, strict=True):
            assert (det.shape, det.color) == (obj.shape, obj.color)
            box_centre = ((obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2)
            assert ((det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2) == pytest.approx(box_centre)


def test_token_judge_passes_the_prompts_own_scenes_and_fails_empty_grids(bench) -> None:
    records = [r for _, r in balanced_subset(load_eval_prompts(), 24)]
    rng = np.random.default_rng(1)
    tokens = torch.stack([bench.ideal_tokens(scene_for_prompt(r, rng)) for r in records])  # (24, C, 8, 8)
    ceiling = bench.token_geneval(tokens, records)
    assert ceiling["found"] == 1.0 and ceiling["overall"] >= 0.9  # the square box can miss a position margin
    empty = tokens.clone()
    empty[:, bench.PRESENCE] = 0.0
    scores = bench.token_geneval(empty, records)
    assert scores.keys() == ceiling.keys() and set(scores.values()) == {0.0}


def test_tiny_run_trains_samples_and_logs(bench, tmp_path: Path) -> None:
    save_untrained_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    rows = bench.main(
        [str(tmp_path / "model"), "--scenes", "40", "--steps", "3", "--eval-every", "2", "--batch", "4",
         "--prompts", "6", "--cfg", "1", "--sample-steps", "2", "--decoder-steps", "2", "--decoder-batch", "2",
         "--decoder-scenes", "8", "--decoder-eval-every", "2", "--decoder-sample-steps", "1", "--threads", "1",
         "--out", str(out)]
    )  # fmt: skip
    assert [next(iter(r)) for r in rows] == ["ceiling", "renders_themselves", "decoder_step", "step", "step"]
    assert [r["step"] for r in rows[3:]] == [2, 3] and set(rows[3]["cfg1"]) >= {"found", "overall"}
    assert rows[2]["round_trip"].keys() == {"found", "geneval"}
    assert [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] == rows
    assert (out / "round_trip_step2.png").is_file() and (out / "dit_samples_step3_cfg1.pt").is_file()


def test_bag_condition_holds_each_object_once_and_no_position(bench) -> None:
    """One token per object (shape + colour embedding), zeros after; moving the objects changes nothing."""
    from dataclasses import replace

    bag = bench.BagCondition(width=16)
    scene = sample_scene(np.random.default_rng(2))
    tokens = bag(scene, np.random.default_rng(0))  # (9, 16)
    n = len(scene.objects)
    assert tokens.shape == (9, 16) and torch.equal(tokens[n:], torch.zeros(9 - n, 16))
    expected = sorted(
        (bag.shape[bench.SHAPES.index(o.shape)] + bag.color[bench.COLOR_NAMES.index(o.color)]).tolist()
        for o in scene.objects
    )
    assert sorted(tokens[:n].tolist()) == expected
    moved = replace(scene, objects=tuple(replace(o, box=(0, 0, 12, 12)) for o in scene.objects))
    assert torch.equal(bag(moved, np.random.default_rng(0)), tokens)
    with pytest.raises(ValueError, match="holds 9 objects"):
        bag(replace(scene, objects=scene.objects * 10), np.random.default_rng(0))


def test_tiny_run_with_the_bag_condition(bench, tmp_path: Path) -> None:
    save_untrained_tiny_model(tmp_path / "model")
    rows = bench.main(
        [str(tmp_path / "model"), "--scenes", "20", "--steps", "2", "--eval-every", "2", "--batch", "4",
         "--prompts", "6", "--cfg", "3", "--sample-steps", "2", "--condition", "bag", "--threads", "1"]
    )  # fmt: skip
    assert [next(iter(r)) for r in rows] == ["ceiling", "step"]
    assert rows[1]["step"] == 2 and set(rows[1]["cfg3"]) >= {"found", "overall"}


@pytest.mark.parametrize(
    "arm", [["--condition", "model", "--with-prompt"], ["--condition", "model", "--slots", "3"],
            ["--condition", "readout"], ["--condition", "readout", "--readout-queries", "2"],
            ["--condition", "model", "--standardize", "--dit-layers", "1"],
            ["--condition", "slots", "--slot-steps", "2"]],
)  # fmt: skip
def test_tiny_runs_with_conditions_read_from_the_model(bench, tmp_path: Path, arm: list[str]) -> None:
    save_untrained_tiny_model(tmp_path / "model")
    rows = bench.main(
        [str(tmp_path / "model"), "--scenes", "20", "--steps", "2", "--eval-every", "2", "--batch", "4",
         "--prompts", "6", "--cfg", "3", "--sample-steps", "2", "--threads", "1", *arm]
    )  # fmt: skip
    assert [next(iter(r)) for r in rows] == ["ceiling", "step"]
    assert rows[1]["step"] == 2 and set(rows[1]["cfg3"]) >= {"found", "overall"}


def test_slot_reader_gives_each_slot_its_own_token_and_ignores_the_condition_length(bench) -> None:
    from blip3o.models.dit import DiT, DiTConfig

    reader = bench.SlotReader(DiT(DiTConfig.tiny()), slots=3)
    seen = []
    reader.dit.forward = lambda x, t, condition: seen.append(condition) or x
    condition = torch.randn(2, 5, 48)  # (B, L, H)
    reader(torch.zeros(2, 32, 4, 4), torch.zeros(2), condition)
    reader(torch.zeros(2, 32, 4, 4), torch.zeros(2), condition.repeat(1, 2, 1))  # same mean, twice as long
    assert seen[0].shape == (2, 3, 48) and torch.allclose(seen[0], seen[1], atol=1e-5)
    assert not torch.allclose(seen[0][:, 0], seen[0][:, 1])  # each slot is its own map of the pooled state
