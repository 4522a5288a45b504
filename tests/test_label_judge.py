"""bench/label_judge.py: judging an object-centric model's generated tokens through its CLIP label head."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, PATCH_LABEL_VALUES, scene_object_labels
from blip3o.train.stages import fit_feature_statistics
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "label_judge.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def test_exact_labels_pass_their_prompts_and_none_fail(bench) -> None:
    records = [r for _, r in balanced_subset(load_eval_prompts(), 24)]
    rng = np.random.default_rng(0)
    labels = torch.stack([scene_object_labels(scene_for_prompt(r, rng), 8) for r in records])  # (24, 64, 19)
    exact = bench.judge_labels(labels, records)
    assert exact["found"] == 1.0 and exact["overall"] >= 0.9  # the square box can miss a position margin
    empty = labels.clone()
    empty[..., : PATCH_LABEL_GROUPS[0]] = torch.eye(PATCH_LABEL_GROUPS[0])[-1]  # every patch says "none"
    assert set(bench.judge_labels(empty, records).values()) == {0.0}


def test_tiny_object_model_is_judged_and_others_are_refused(bench, tmp_path: Path) -> None:
    base = tiny_config(tokenizer_corpus_scenes=100)
    clip = replace(base.clip, patch_label_weight=1.0, patch_label_groups=PATCH_LABEL_GROUPS,
                   patch_label_values=PATCH_LABEL_VALUES, patch_label_kind="object", target_basis="labels",
                   target_components=19)  # fmt: skip
    model = Blip3o.from_config(replace(base, clip=clip, dit=replace(base.dit, in_channels=19)), seed=0)
    rng = np.random.default_rng(0)
    fit_feature_statistics(model, [render(sample_scene(rng)) for _ in range(8)])
    model.save_pretrained(tmp_path / "object")
    result = bench.main([str(tmp_path / "object"), "--prompts", "6", "--cfg", "1", "3", "--steps", "2",
                         "--threads", "1"])  # fmt: skip
    assert set(result) == {"model", "prompts", "ceiling", "cfg1", "cfg3"} and result["prompts"] == 6
    assert {"found", "overall"} <= set(result["cfg3"])
    save_untrained_tiny_model(tmp_path / "plain")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "plain"), "--prompts", "6"])
