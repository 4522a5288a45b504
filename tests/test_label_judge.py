"""bench/label_judge.py: judging an object-centric model's generated tokens through its CLIP label head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blip3o.eval.model_eval import balanced_subset
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, scene_object_labels
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.judge import Candidate, Detection, detect
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from conftest import load_script, save_untrained_tiny_model, tiny_object_label_model

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


def test_verdict_agreement_counts_each_pair(bench) -> None:
    tokens = [True, True, False, False, True]
    pixels = [True, False, True, False, False]
    assert bench.verdict_agreement(tokens, pixels) == {
        "both": 1,
        "tokens_only": 2,
        "pixels_only": 1,
        "neither": 1,
    }
    with pytest.raises(ValueError):
        bench.verdict_agreement(tokens, pixels[:3])


def test_lost_grid_labels_each_image_with_the_judge_objects(bench) -> None:
    records = [r for _, r in balanced_subset(load_eval_prompts(), 12)][:3]
    rng = np.random.default_rng(0)
    images = [render(scene_for_prompt(r, rng)) for r in records]
    labels = bench.judged_labels(images, records)
    for label, record, image in zip(labels, records, images, strict=True):
        prompt, judged = label.split(" | judge: ")
        assert record["prompt"].endswith(prompt)
        # a render's objects are segmented and recognised with full confidence
        assert judged.count(" 1.00") == len(detect(image)) >= 1, label
    grid = bench.lost_grid(images, records)
    assert grid.width == 3 * 128 and grid.height > 128  # one cell per image (fewer than 8), labels below


def test_head_accuracy_counts_objects_classes_and_value_errors(bench) -> None:
    rng = np.random.default_rng(1)
    truth = torch.stack([scene_object_labels(sample_scene(rng), 8) for _ in range(6)])  # (6, 64, 19)
    exact = bench.head_accuracy(truth, truth)
    assert exact["objects"] == int((truth[..., 5] == 0).sum()) > 6
    assert {k: v for k, v in exact.items() if k != "objects"} == {
        "recall": 1.0, "precision": 1.0, "shape": 1.0, "colour": 1.0,
        "dx_mae": 0.0, "dy_mae": 0.0, "size_mae": 0.0, "rotation_mae": 0.0,
    }  # fmt: skip
    read = truth.clone()
    first = (truth[0, :, 5] == 0).nonzero()[0, 0]  # the first object centre of image 0
    read[0, first, :6] = torch.eye(6)[(truth[0, first, :5].argmax() + 1) % 5]  # another shape
    read[1, :, 15] += 0.5  # every dx of image 1 off by 0.5
    read[2, (truth[2, :, 5] == 1).nonzero()[0, 0], :6] = torch.eye(6)[0]  # an empty patch read as a circle
    wrong = bench.head_accuracy(read, truth)
    n = exact["objects"]
    assert wrong["shape"] == pytest.approx((n - 1) / n) and wrong["recall"] == 1.0
    assert wrong["precision"] == pytest.approx(n / (n + 1))
    image1 = int((truth[1, :, 5] == 0).sum())
    assert wrong["dx_mae"] == pytest.approx(0.5 * image1 / n) and wrong["dy_mae"] == 0.0


def test_tiny_object_model_is_judged_and_others_are_refused(bench, tmp_path: Path) -> None:
    tiny_object_label_model().save_pretrained(tmp_path / "object")
    result = bench.main([str(tmp_path / "object"), "--prompts", "6", "--cfg", "1", "3", "--steps", "2",
                         "--threads", "1"])  # fmt: skip
    assert set(result) == {"model", "prompts", "head", "ceiling", "cfg1", "cfg3"} and result["prompts"] == 6
    assert 0.0 <= result["head"]["recall"] <= 1.0 and result["head"]["objects"] >= 6
    assert {"found", "overall"} <= set(result["cfg3"])
    drawn = bench.main([str(tmp_path / "object"), "--prompts", "6", "--cfg", "3", "--steps", "2", "--threads", "1",
                        "--pixels", "--grid", str(tmp_path / "lost.png")])  # fmt: skip
    assert drawn["cfg3"] == result["cfg3"]  # same seed, same tokens
    agreement = {k: drawn["cfg3_pixels"][k] for k in bench.AGREEMENT_KEYS}
    assert sum(agreement.values()) == 6 and {"found", "overall"} <= set(drawn["cfg3_pixels"])
    assert (tmp_path / "lost.png").is_file() == (agreement["tokens_only"] > 0)
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "object"), "--grid", str(tmp_path / "x.png")])
    save_untrained_tiny_model(tmp_path / "plain")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "plain"), "--prompts", "6"])


def test_token_category_counts_outcomes_and_checks_its_input(tmp_path: Path) -> None:
    category = load_script(BENCH.with_name("token_category.py"))
    record = next(r for r in load_eval_prompts() if r["tag"] == "counting" and r["include"][0]["count"] == 3)
    scene = scene_for_prompt(record, np.random.default_rng(0), distractors=0)
    exact = list(detect(render(scene)))
    assert category.count_outcome(record, exact) == "pass"
    assert category.count_outcome(record, exact[:2]) == "few"
    assert category.count_outcome(record, exact + exact[:1]) == "many"
    boxes = [(0, 0, 10, 10), (8, 0, 18, 10), (40, 40, 52, 52)]  # the first two overlap by 2 px
    found = [Detection("circle", "red", box, 1.0) for box in boxes]
    assert category.closest_gap(found) == -2 and category.closest_gap(found[:1]) is None
    groups = category.gap_groups({(True, False): [-2.0, 4.0, None], (True, True): [3.0]})
    assert groups["tokens pass, pixels fail"] == {
        "samples": 3, "with_pairs": 2, "median_gap": 1.0, "overlapping": 0.5, "closer_than_2px": 0.5
    }  # fmt: skip
    assert groups["tokens pass, pixels pass"]["closer_than_2px"] == 0.0
    tiny_object_label_model().save_pretrained(tmp_path / "object")
    argv = [str(tmp_path / "object"), "--seeds", "2", "--steps", "2", "--threads", "1", "--pixels",
            "--decoder-steps", "2", "--gaps", "--why-few"]  # fmt: skip
    result = category.main(argv)
    assert sum(group["samples"] for group in result["gaps"].values()) == result["samples"]
    passed_both = result["gaps"].get("tokens pass, pixels pass", {}).get("samples", 0)
    assert passed_both <= min(result["outcomes"].get("pass", 0), result["pixels"]["outcomes"].get("pass", 0))
    few_in_pixels = sum(n for k, n in result["pixels"]["outcomes"].items() if k.endswith(": few"))
    assert sum(result["why_few"].values()) == few_in_pixels  # every image with too few gets one reason
    counting = sum(r["tag"] == "counting" for r in load_eval_prompts())
    assert result["samples"] == 2 * counting
    for judged in (result, result["pixels"]):  # the tokens' verdicts, then the decoded images'
        assert sum(n for k, n in judged["outcomes"].items() if k.startswith("want")) == result["samples"]
        assert judged["outcomes"].get("pass", 0) + judged["outcomes"].get("fail", 0) == result["samples"]
        assert judged["pass_rate"] == judged["outcomes"].get("pass", 0) / result["samples"]
    with pytest.raises(SystemExit):
        category.main([str(tmp_path / "object"), "--category", "nonsense"])
    with pytest.raises(SystemExit):
        category.main([str(tmp_path / "object"), "--gaps"])  # without --pixels
    with pytest.raises(SystemExit):
        category.main([str(tmp_path / "object"), "--why-few"])  # without --pixels


def test_few_reason_tells_a_rejected_object_from_a_missing_one() -> None:
    category = load_script(BENCH.with_name("token_category.py"))
    record = next(r for r in load_eval_prompts() if r["tag"] == "counting" and r["include"][0]["count"] == 3)
    shape = record["include"][0]["class"]

    def candidate(confidence: float) -> Candidate:
        return Candidate((0, 0, 12, 12), (0.0, 0.0, 0.0), "red", 1.0, np.zeros(4), shape, confidence, 1.0)

    assert category.few_reason(record, [candidate(0.9), candidate(0.9), candidate(0.1)]) == "rejected"
    assert category.few_reason(record, [candidate(0.9), candidate(0.9)]) == "missing"
    assert category.few_reason(record, [candidate(0.1), candidate(0.2), candidate(0.3)]) == "rejected"
