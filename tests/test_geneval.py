"""ShapesGenEval: GenEval's scoring rules, the scene-graph oracle, conditioned scenes, the sample layout, the CLI."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from blip3o.cli import eval_geneval
from blip3o.cli import main as cli_main
from blip3o.eval.geneval import (
    RESULTS_FILE,
    SCORES_FILE,
    TABLE_FILE,
    OracleDetection,
    SampleFolderError,
    detection_verdicts,
    format_table,
    read_sample_folder,
    scene_detections,
    score_detection_lists,
    score_detections,
    score_sample_folder,
    summarize,
    write_prompt_samples,
    write_sample_folder,
)
from blip3o.world import prompts
from blip3o.world.conditioned import near_miss_kinds, near_miss_scene, scene_for_prompt
from blip3o.world.prompts import CATEGORIES, load_eval_prompts
from blip3o.world.render import render
from blip3o.world.scene import relations_between


def det(shape, color=None, box=(0, 0, 10, 10), confidence=0.9) -> OracleDetection:
    return OracleDetection(shape, color, tuple(float(v) for v in box), confidence)


LEFT = (0, 20, 12, 32)
RIGHT = (40, 20, 52, 32)
TOP = (20, 0, 32, 12)
BOTTOM = (20, 40, 32, 52)


@pytest.fixture(scope="module")
def eval_records() -> list[dict]:
    return load_eval_prompts()


# ------------------------------------------------------------------------------- relations and scoring rules


def test_relations_on_hand_made_boxes():
    assert relations_between(LEFT, RIGHT) == {"left of"}
    assert relations_between(RIGHT, LEFT) == {"right of"}
    assert relations_between(TOP, BOTTOM) == {"above"}
    assert relations_between(BOTTOM, TOP) == {"below"}
    # Diagonal at 45 degrees: both components pass the 0.5 cut.
    assert relations_between((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    # Centres closer than the margin (0.1 x the summed extents): no relation at all.
    assert relations_between((0, 0, 20, 20), (3, 1, 23, 21)) == set()
    # Mostly horizontal offset with a small vertical one: only the horizontal relation.
    assert relations_between((0, 0, 10, 10), (30, 6, 40, 16)) == {"left of"}


def test_single_object_present_and_missing():
    meta = prompts.single_object_record("star")
    assert score_detections(meta, [det("star")]) == (True, "")
    correct, reason = score_detections(meta, [det("circle")])
    assert not correct and "expected 1 star, found 0" in reason
    assert score_detections(meta, []) == (False, "expected 1 star, found 0")


def test_two_object_needs_both():
    meta = prompts.two_object_record("circle", "cross")
    assert score_detections(meta, [det("cross"), det("circle")])[0]
    correct, reason = score_detections(meta, [det("circle"), det("circle")])
    assert not correct and "cross" in reason


def test_color_is_checked_on_the_most_confident_detections():
    meta = prompts.colors_record("triangle", "green")
    assert score_detections(meta, [det("triangle", "green")])[0]
    correct, reason = score_detections(meta, [det("triangle", "red")])
    assert not correct and "expected 1 green triangle" in reason
    # An unrecognised colour (None) is not the asked colour.
    assert not score_detections(meta, [det("triangle", None)])[0]
    # Only the top-`count` detections of the class count: a less confident green one does not help...
    dets = [det("triangle", "green", confidence=0.4), det("triangle", "red", confidence=0.8)]
    assert not score_detections(meta, dets)[0]
    # ...whatever order the detections arrive in; a more confident green one does.
    dets = [det("triangle", "red", confidence=0.4), det("triangle", "green", confidence=0.8)]
    assert score_detections(meta, dets)[0]


def test_counting_include_and_exclude():
    meta = prompts.counting_record("star", 3)
    three = [det("star") for _ in range(3)]
    assert score_detections(meta, [*three, det("circle")])[0]
    correct, reason = score_detections(meta, three[:2])
    assert not correct and "expected 3 star, found 2" in reason
    correct, reason = score_detections(meta, [*three, det("star", confidence=0.1)])
    assert not correct and reason == "expected fewer than 4 star, found 4"


def test_counting_with_color_needs_every_counted_object_in_that_color():
    meta = prompts.counting_record("cross", 2, "red")
    assert score_detections(meta, [det("cross", "red"), det("cross", "red")])[0]
    assert not score_detections(meta, [det("cross", "red"), det("cross", "blue")])[0]


def test_position_success_and_wrong_relation():
    meta = prompts.position_record("square", "left of", "star")
    assert score_detections(meta, [det("star", box=RIGHT), det("square", box=LEFT)]) == (True, "")
    correct, reason = score_detections(meta, [det("star", box=LEFT), det("square", box=RIGHT)])
    assert not correct and reason == "expected square left of star, found right of"
    correct, reason = score_detections(meta, [det("star", box=TOP), det("square", box=TOP)])
    assert not correct and "found no relation" in reason


def test_position_without_its_target_group_is_wrong():
    meta = prompts.position_record("square", "left of", "star")
    correct, reason = score_detections(meta, [det("square", box=LEFT)])
    assert not correct
    assert reason == "expected 1 star, found 0; no target for square to be left of"
    # A target group that fails its colour check also leaves nothing to be positioned against.
    colored = prompts.position_record("square", "above", "star", color="red", target_color="blue")
    dets = [det("star", "green", box=BOTTOM), det("square", "red", box=TOP)]
    correct, reason = score_detections(colored, dets)
    assert not correct and "no target for square to be above" in reason
    dets = [det("star", "blue", box=BOTTOM), det("square", "red", box=TOP)]
    assert score_detections(colored, dets)[0]


def test_position_must_hold_against_every_target_object():
    meta = {
        "tag": "position",
        "include": [
            {"class": "star", "count": 2},
            {"class": "square", "count": 1, "position": ["left of", 0]},
        ],
        "exclude": [],
        "prompt": "a square left of two stars",
    }
    assert score_detections(
        meta, [det("star", box=RIGHT), det("star", box=(40, 40, 52, 52)), det("square", box=LEFT)]
    )[0]
    assert not score_detections(
        meta, [det("star", box=RIGHT), det("star", box=(0, 45, 10, 55)), det("square", box=LEFT)]
    )[0]


def test_position_may_only_refer_to_an_earlier_include():
    meta = {
        "tag": "position",
        "include": [{"class": "star", "count": 1, "position": ["above", 0]}],
        "prompt": "x",
    }
    with pytest.raises(ValueError, match="not before it"):
        score_detections(meta, [det("star")])


# ------------------------------------------------------------------------------- oracle and conditioned scenes


def test_oracle_reads_the_scene_graph(eval_records):
    scene = scene_for_prompt(eval_records[0], np.random.default_rng(0), distractors=2)
    dets = scene_detections(scene)
    assert [(d.shape, d.color, d.box, d.confidence) for d in dets] == [
        (o.shape, o.color, o.box, 1.0) for o in scene.objects
    ]


def test_scene_for_every_eval_prompt_is_scored_correct(eval_records):
    rng = np.random.default_rng(1)
    for meta in eval_records:
        for distractors in ((0, 2), 3):
            scene = scene_for_prompt(meta, rng, distractors=distractors)
            correct, reason = score_detections(meta, scene_detections(scene))
            assert correct, (meta["prompt"], reason, scene.objects)
            assert scene.meta["prompt"] == meta["prompt"]


def test_detection_lists_are_scored_per_category(eval_records):
    by_tag: dict[str, list[dict]] = {}
    for record in eval_records:
        by_tag.setdefault(record["tag"], []).append(record)
    records = [by_tag["single_object"][0], by_tag["single_object"][1], by_tag["colors"][0]]
    rng = np.random.default_rng(3)
    right = [scene_detections(scene_for_prompt(r, rng)) for r in records]
    # single_object: one right, one empty (1/2); colors: right (1/1). Overall is the mean of the categories.
    scores = score_detection_lists(records, [right[0], [], right[2]])
    assert scores == {"found": 0.667, "overall": 0.75, "single_object": 0.5, "colors": 1.0}
    with pytest.raises(ValueError, match="2 detection lists for 3"):
        score_detection_lists(records, right[:2])
    # The caller's own verdicts are used as given (no second scoring), and must match the lists in number.
    verdicts = detection_verdicts(records, [right[0], [], right[2]])
    assert verdicts == [True, False, True]
    assert score_detection_lists(records, [right[0], [], right[2]], verdicts) == scores
    assert score_detection_lists(records, [right[0], [], right[2]], [False, False, True])["overall"] == 0.5
    with pytest.raises(ValueError, match="2 verdicts and 3 detection lists"):
        score_detection_lists(records, [right[0], [], right[2]], verdicts[:2])


def test_distractors_fill_the_scene_when_asked(eval_records):
    rng = np.random.default_rng(2)
    by_tag = {r["tag"]: r for r in eval_records}
    assert len(scene_for_prompt(by_tag["single_object"], rng, distractors=0).objects) == 1
    assert len(scene_for_prompt(by_tag["single_object"], rng, distractors=2).objects) == 3
    assert len(scene_for_prompt(by_tag["position"], rng, distractors=5).objects) == 4  # capped at 4
    four = prompts.counting_record("star", 4)
    assert [o.shape for o in scene_for_prompt(four, rng, distractors=2).objects] == ["star"] * 4


def test_scene_for_prompt_is_deterministic(eval_records):
    meta = eval_records[-1]
    a = scene_for_prompt(meta, np.random.default_rng(7))
    b = scene_for_prompt(meta, np.random.default_rng(7))
    assert a == b


def test_near_misses_of_every_eval_prompt_are_scored_wrong(eval_records):
    rng = np.random.default_rng(3)
    seen: dict[str, set[str]] = {}
    for meta in eval_records:
        for kind in near_miss_kinds(meta):
            scene, got = near_miss_scene(meta, rng, kind)
            assert got == kind and scene.meta["near_miss"] == kind
            correct, _ = score_detections(meta, scene_detections(scene))
            assert not correct, (meta["prompt"], kind, scene.objects)
            seen.setdefault(meta["tag"], set()).add(kind)
        scene, kind = near_miss_scene(meta, rng)  # a random applicable kind
        assert kind in near_miss_kinds(meta) and not score_detections(meta, scene_detections(scene))[0]
    assert seen == {
        "single_object": {"count", "shape"},
        "two_object": {"count", "shape"},
        "counting": {"count", "shape"},
        "colors": {"color", "count", "shape"},
        "position": {"count", "shape", "relation"},
        "color_attr": {"color", "count", "shape"},
    }


def test_near_miss_relation_reverses_the_relation():
    meta = prompts.position_record("square", "left of", "star")
    scene, _ = near_miss_scene(meta, np.random.default_rng(4), "relation", distractors=0)
    square = next(o for o in scene.objects if o.shape == "square")
    star = next(o for o in scene.objects if o.shape == "star")
    assert "right of" in relations_between(square.box, star.box)


def test_near_miss_count_of_counting_is_one_off():
    meta = prompts.counting_record("star", 3)
    rng = np.random.default_rng(5)
    counts = set()
    for _ in range(30):
        scene, _ = near_miss_scene(meta, rng, "count", distractors=0)
        counts.add(sum(o.shape == "star" for o in scene.objects))
    assert counts == {2, 4}


def test_near_miss_rejects_a_kind_that_does_not_apply():
    with pytest.raises(ValueError, match="does not apply"):
        near_miss_scene(prompts.colors_record("star", "red"), np.random.default_rng(0), "relation")
    with pytest.raises(ValueError, match="does not apply"):
        near_miss_scene(prompts.single_object_record("star"), np.random.default_rng(0), "color")


def test_training_prompts_also_get_conditioned_scenes():
    rng = np.random.default_rng(6)
    for meta in prompts.load_train_prompts()[::7]:
        assert score_detections(meta, scene_detections(scene_for_prompt(meta, rng)))[0], meta["prompt"]
        scene, kind = near_miss_scene(meta, rng)
        assert not score_detections(meta, scene_detections(scene))[0], (meta["prompt"], kind)


# ------------------------------------------------------------------------------- aggregation


def test_overall_is_the_mean_of_category_accuracies():
    results = [{"tag": "single_object", "correct": True}] * 3 + [{"tag": "single_object", "correct": False}]
    results += [{"tag": "counting", "correct": False}] * 96 + [{"tag": "counting", "correct": True}] * 4
    summary = summarize(results)
    assert summary["categories"]["single_object"] == {"correct": 3, "images": 4, "accuracy": 0.75}
    assert summary["categories"]["counting"]["accuracy"] == pytest.approx(0.04)
    assert summary["overall"] == pytest.approx((0.75 + 0.04) / 2)  # not 7 / 104
    assert summary["images"] == 104
    assert summary["missing_categories"] == ["two_object", "colors", "position", "color_attr"]
    table = format_table(summary)
    assert "single_object" in table and "0.7500" in table and "overall" in table and "missing" in table


# ------------------------------------------------------------------------------- sample folder


def _oracle_folder(tmp_path, records, n_images: int):
    """Write a sample folder whose even images satisfy their prompt and odd ones are near misses; return a
    detect_fn that recognises each rendered image by its pixels and reports its scene graph."""
    rng = np.random.default_rng(8)
    scenes_by_pixels = {}
    images_per_record = []
    for meta in records:
        images = []
        for k in range(n_images):
            scene = scene_for_prompt(meta, rng) if k % 2 == 0 else near_miss_scene(meta, rng)[0]
            image = render(scene)
            scenes_by_pixels[image.tobytes()] = scene
            images.append(image)
        images_per_record.append(images)
    write_sample_folder(tmp_path, records, images_per_record)

    def detect_fn(image):
        return scene_detections(scenes_by_pixels[image.tobytes()])

    return detect_fn


def test_sample_folder_round_trip_with_the_oracle(tmp_path, eval_records):
    records = [next(r for r in eval_records if r["tag"] == tag) for tag in CATEGORIES]
    samples, out = tmp_path / "samples", tmp_path / "scores"
    detect_fn = _oracle_folder(samples, records, n_images=4)

    # GenEval's layout: numbered folders, the record on one line, numbered PNGs.
    assert sorted(p.name for p in samples.iterdir()) == [f"{i:05d}" for i in range(6)]
    assert (samples / "00002" / "metadata.jsonl").read_text().count("\n") == 1
    assert json.loads((samples / "00002" / "metadata.jsonl").read_text()) == records[2]
    assert sorted(p.name for p in (samples / "00005" / "samples").iterdir()) == [
        f"{k:04d}.png" for k in range(4)
    ]

    results = score_sample_folder(samples, detect_fn, out_dir=out, progress=False)
    assert len(results.images) == 24
    assert [r["correct"] for r in results.images] == [True, False, True, False] * 6
    assert all(r["reason"] for r in results.images if not r["correct"])
    assert results.images[4]["folder"] == 1 and results.images[4]["image"] == "00001/samples/0000.png"
    assert results.summary["overall"] == pytest.approx(0.5)
    assert results.summary["prompts"] == 6 and results.summary["missing_categories"] == []
    assert all(c["accuracy"] == 0.5 for c in results.summary["categories"].values())

    lines = (out / RESULTS_FILE).read_text().splitlines()
    assert [json.loads(line)["correct"] for line in lines] == [r["correct"] for r in results.images]
    assert json.loads((out / SCORES_FILE).read_text()) == results.summary
    assert (out / TABLE_FILE).read_text().strip() == results.table


def test_write_sample_folder_checks_lengths_and_refuses_to_mix_runs(tmp_path, eval_records):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="ran out"):
        write_sample_folder(tmp_path / "a", eval_records[:2], [[image]])
    with pytest.raises(ValueError, match="more image sets"):
        write_sample_folder(tmp_path / "b", eval_records[:1], [[image], [image]])
    write_prompt_samples(tmp_path / "c", 0, eval_records[0], [image])
    with pytest.raises(FileExistsError):
        write_prompt_samples(tmp_path / "c", 0, eval_records[0], [image])


def test_sample_folder_errors(tmp_path, eval_records):
    with pytest.raises(SampleFolderError, match="does not exist"):
        read_sample_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SampleFolderError, match="no numbered prompt folders"):
        read_sample_folder(tmp_path / "empty")

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    folder = write_prompt_samples(tmp_path / "bad", 0, eval_records[0], [image])
    (folder / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(SampleFolderError, match=r"00000/metadata.jsonl is not valid JSON"):
        read_sample_folder(tmp_path / "bad")
    (folder / "metadata.jsonl").write_text('{"tag": "colors"}\n')
    with pytest.raises(SampleFolderError, match="lacks the key"):
        read_sample_folder(tmp_path / "bad")
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(SampleFolderError, match="is missing"):
        read_sample_folder(tmp_path / "bad")

    folder = write_prompt_samples(tmp_path / "noimg", 0, eval_records[0], [])
    with pytest.raises(SampleFolderError, match=r"holds no \.png images"):
        read_sample_folder(tmp_path / "noimg")


# ------------------------------------------------------------------------------- CLI


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    assert cli_main.main(["eval", "geneval", "--samples", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err


def test_cli_scores_a_folder_with_the_judge(tmp_path, monkeypatch, capsys, eval_records):
    records = [next(r for r in eval_records if r["tag"] == tag) for tag in CATEGORIES]
    detect_fn = _oracle_folder(tmp_path / "samples", records, n_images=2)
    # Stand-in judge: the CLI imports `detect` from blip3o.world.judge when it runs.
    monkeypatch.setitem(sys.modules, "blip3o.world.judge", types.SimpleNamespace(detect=detect_fn))
    argv = ["--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "scores"), "--no-progress"]
    assert eval_geneval.main(argv) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "0.5000" in printed
    assert json.loads((tmp_path / "scores" / SCORES_FILE).read_text())["overall"] == pytest.approx(0.5)
