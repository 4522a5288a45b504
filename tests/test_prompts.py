"""ShapesGenEval prompt files: counts, schema, bit-exact regeneration, train/eval disjointness."""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections import Counter
from importlib import resources

import numpy as np
import pytest

from blip3o.world import prompts
from blip3o.world.prompts import (
    CATEGORIES,
    MIN_IMAGES_PER_CATEGORY,
    build_eval_records,
    build_train_records,
    load_eval_prompts,
    load_train_prompts,
    to_jsonl,
    write_prompt_files,
)
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, RELATIONS, SHAPES, plural

EXPECTED_EVAL_COUNTS = {
    "single_object": 5,
    "two_object": 20,
    "counting": 15,
    "colors": 40,
    "position": 80,
    "color_attr": 400,
}


@pytest.fixture(scope="module")
def eval_records() -> list[dict]:
    return load_eval_prompts()


@pytest.fixture(scope="module")
def train_records() -> list[dict]:
    return load_train_prompts()


def test_eval_prompt_counts_per_category(eval_records):
    counts = Counter(r["tag"] for r in eval_records)
    assert dict(counts) == EXPECTED_EVAL_COUNTS
    assert len(eval_records) >= 550
    # Records are grouped by category, in GenEval's category order.
    assert [tag for tag, _ in itertools.groupby(r["tag"] for r in eval_records)] == list(CATEGORIES)


def test_every_category_is_scored_on_enough_images(eval_records):
    for tag in CATEGORIES:
        records = [r for r in eval_records if r["tag"] == tag]
        per_prompt = {r["n_samples"] for r in records}
        assert per_prompt == {math.ceil(MIN_IMAGES_PER_CATEGORY / len(records))}, tag
        assert sum(r["n_samples"] for r in records) >= MIN_IMAGES_PER_CATEGORY, tag
    assert {r["tag"]: r["n_samples"] for r in eval_records} == {
        "single_object": 64,
        "two_object": 16,
        "counting": 22,
        "colors": 8,
        "position": 4,
        "color_attr": 1,
    }


def _check_schema(record: dict) -> None:
    assert set(record) <= {"tag", "include", "exclude", "prompt", "n_samples"}
    assert record["tag"] in CATEGORIES
    assert isinstance(record["prompt"], str) and record["prompt"] == record["prompt"].strip()
    assert record["include"], record
    for index, inc in enumerate(record["include"]):
        assert set(inc) <= {"class", "count", "color", "position"}
        assert inc["class"] in SHAPES
        assert isinstance(inc["count"], int) and 1 <= inc["count"] <= 4
        if "color" in inc:
            assert inc["color"] in COLOR_NAMES
            assert inc["color"] in record["prompt"].split()
        if "position" in inc:
            relation, target = inc["position"]
            assert relation in RELATIONS and relation in record["prompt"]
            assert isinstance(target, int) and 0 <= target < index
        assert plural(inc["class"], inc["count"]) in record["prompt"].split()
    for exc in record["exclude"]:
        assert set(exc) == {"class", "count"} and exc["class"] in SHAPES


def test_schema_of_every_record(eval_records, train_records):
    for record in eval_records + train_records:
        _check_schema(record)
    assert all("n_samples" in r for r in eval_records)


def test_category_shapes_follow_geneval(eval_records):
    for r in eval_records:
        inc, exc = r["include"], r["exclude"]
        if r["tag"] == "counting":
            assert len(inc) == 1 and 2 <= inc[0]["count"] <= 4
            assert exc == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        else:
            assert exc == []
        if r["tag"] == "position":
            # The target comes first; the positioned object refers back to it.
            assert len(inc) == 2 and "position" not in inc[0] and inc[1]["position"][1] == 0
            assert inc[0]["class"] != inc[1]["class"]
        if r["tag"] == "color_attr":
            assert len(inc) == 2
            assert inc[0]["class"] != inc[1]["class"] and inc[0]["color"] != inc[1]["color"]


def test_prompt_wording():
    assert prompts.position_record("square", "left of", "star") == {
        "tag": "position",
        "include": [
            {"class": "star", "count": 1},
            {"class": "square", "count": 1, "position": ["left of", 0]},
        ],
        "exclude": [],
        "prompt": "a photo of a square left of a star",
    }
    assert prompts.single_object_record("star")["prompt"] == "a photo of a star"
    assert prompts.two_object_record("circle", "cross")["prompt"] == "a photo of a circle and a cross"
    assert prompts.counting_record("star", 3)["prompt"] == "a photo of three stars"
    assert prompts.counting_record("cross", 2, "red")["prompt"] == "a photo of two red crosses"
    assert prompts.colors_record("triangle", "green")["prompt"] == "a photo of a green triangle"
    assert prompts.colors_record("circle", "orange")["prompt"] == "a photo of an orange circle"
    assert (
        prompts.color_attr_record("circle", "red", "cross", "blue")["prompt"]
        == "a photo of a red circle and a blue cross"
    )
    assert prompts.single_object_record("star", "an image of")["prompt"] == "an image of a star"


def test_articles_are_right(eval_records, train_records):
    for r in eval_records + train_records:
        words = r["prompt"].split()
        for article, word in itertools.pairwise(words):
            if article in ("a", "an"):
                assert article == ("an" if word[0] in "aeiou" else "a"), r["prompt"]


def test_prompts_are_unique_and_train_is_disjoint_from_eval(eval_records, train_records):
    eval_prompts = [r["prompt"] for r in eval_records]
    train_prompts = [r["prompt"] for r in train_records]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(train_records) >= 1500
    assert not set(eval_prompts) & set(train_prompts)


def test_color_attr_eval_sample_and_train_partition_all_combinations(eval_records, train_records):
    all_prompts = {r["prompt"] for r in prompts.all_color_attr()}
    assert len(all_prompts) == 20 * 56
    eval_ca = {r["prompt"] for r in eval_records if r["tag"] == "color_attr"}
    train_ca = {r["prompt"] for r in train_records if r["tag"] == "color_attr"}
    assert eval_ca | train_ca == all_prompts and not eval_ca & train_ca


def test_committed_files_equal_regenerated(tmp_path):
    data = resources.files("blip3o.world").joinpath("data")
    written = write_prompt_files(tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == data.joinpath(name).read_bytes(), f"{name} is stale: regenerate it"
    assert data.joinpath(prompts.EVAL_FILE).read_text() == to_jsonl(build_eval_records())
    assert data.joinpath(prompts.TRAIN_FILE).read_text() == to_jsonl(build_train_records())


def test_parse_jsonl_reports_the_bad_line():
    with pytest.raises(ValueError, match=r"f\.jsonl:2"):
        prompts.parse_jsonl('{"a": 1}\n{oops\n', "f.jsonl")


def _normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


@pytest.mark.skipif(
    importlib.util.find_spec("blip3o.world.language") is None, reason="blip3o.world.language not written yet"
)
def test_no_eval_prompt_is_a_training_caption(eval_records):
    from blip3o.world.language import annotate

    eval_prompts = {_normalize(r["prompt"]) for r in eval_records}
    rng = np.random.default_rng(2024)
    captions = set()
    for _ in range(3000):
        annotation = annotate(sample_scene(rng, noise=False), rng)
        captions.add(_normalize(annotation.short_caption))
        captions.add(_normalize(annotation.long_caption))
    assert len(captions) > 1000  # the captions are varied, so the check means something
    assert not eval_prompts & captions
