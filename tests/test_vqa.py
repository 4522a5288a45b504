"""ShapesVQA: a bit-exact, balanced question set, and a scorer that counts what it should."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from blip3o.cli import eval_vqa
from blip3o.data.shards import generate_sample
from blip3o.eval.vqa import (
    VQA_SEED,
    format_scores,
    read_answers,
    score_answers,
    vqa_digest,
    vqa_images,
    vqa_set,
)
from blip3o.world.language import QA_KINDS
from blip3o.world.render import render

# Fingerprint of the published 2,100-question set. If this changes, ShapesVQA scores are no longer comparable
# with earlier ones: change it only on purpose (new templates, a new world version) and say so.
VQA_DIGEST = "eb37008f44c18da7876d6c975537f3944918755ff00f14c97b8709f6fa9ffa41"


@pytest.fixture(scope="module")
def items():
    return vqa_set()


def test_set_is_regenerated_bit_exactly(items):
    assert vqa_digest(items) == vqa_digest(vqa_set())
    assert vqa_digest(items) == VQA_DIGEST


def test_set_is_large_balanced_and_well_formed(items):
    assert len(items) >= 2000
    assert len({it.id for it in items}) == len(items)
    counts = Counter(it.kind for it in items)
    assert set(counts) == set(QA_KINDS)
    mean = len(items) / len(QA_KINDS)
    assert all(0.8 * mean <= c <= 1.2 * mean for c in counts.values()), counts
    assert all(it.seed == VQA_SEED for it in items)
    per_image = Counter(it.image_index for it in items)
    assert max(per_image.values()) <= 3
    assert len(per_image) >= 600  # many images, not many questions on a few


def test_items_are_the_annotations_of_their_images(items):
    by_image: dict[int, list] = {}
    for it in items:
        by_image.setdefault(it.image_index, []).append(it)
    for index in list(by_image)[::50]:
        _, ann = generate_sample(VQA_SEED, index)
        pairs = {(q.question, q.answer, q.kind) for q in ann.qa}
        assert {(it.question, it.answer, it.kind) for it in by_image[index]} <= pairs


def test_images_match_the_scenes(items):
    some = [it for it in items if it.image_index in (0, 5)]
    images = vqa_images(some)
    assert sorted(images) == [0, 5]
    for index, image in images.items():
        scene, _ = generate_sample(VQA_SEED, index)
        assert np.array_equal(np.asarray(image), np.asarray(render(scene)))


def test_perfect_answers_score_one_and_normalise(items):
    answers = {}
    for it in items:
        given = it.answer.upper() + "."
        if it.kind.startswith("count"):
            given = str(["zero", "one", "two", "three", "four"].index(it.answer))
        answers[it.id] = given
    scores = score_answers(items, answers)
    assert scores["overall"] == 1.0 and scores["missing"] == 0
    assert scores["per_kind"] == dict.fromkeys(QA_KINDS, 1.0)


def test_wrong_and_missing_answers_score_zero(items):
    flip = {"yes": "no", "no": "yes", "zero": "one", "red": "blue", "circle": "square"}
    wrong = {it.id: flip.get(it.answer, "zero") for it in items}
    scores = score_answers(items, wrong)
    assert scores["overall"] == 0.0
    assert set(scores["per_kind"].values()) == {0.0}
    none = score_answers(items, {"not-an-id": "red"})
    assert (none["overall"], none["missing"], none["unexpected"]) == (0.0, len(items), 1)


def test_partial_answers_score_their_fraction(items):
    half = {it.id: it.answer for it in items[::2]}
    scores = score_answers(items, half)
    assert scores["correct"] == len(half)
    assert scores["overall"] == pytest.approx(len(half) / len(items))
    table = format_scores(scores)
    assert all(kind in table for kind in QA_KINDS) and "overall" in table and "no answer" in table


def test_read_answers(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a", "answer": "red"}\n\n{"id": "b", "answer": 2}\n')
    assert read_answers(path) == {"a": "red", "b": "2"}
    path.write_text('{"id": "a", "answer": "red"}\n{"answer": "blue"}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_answers(path)


def test_cli_dumps_questions_and_scores_answers(tmp_path, capsys):
    questions, images = tmp_path / "q.jsonl", tmp_path / "images"
    assert (
        eval_vqa.main(["--n-questions", "21", "--dump-questions", str(questions), "--images", str(images)])
        == 0
    )
    records = [json.loads(line) for line in questions.read_text().splitlines()]
    assert len(records) == 21 and all("answer" not in r for r in records)
    assert all((images / f"{r['image_index']:06d}.png").is_file() for r in records)

    truth = {it.id: it.answer for it in vqa_set(21)}
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"id": r["id"], "answer": truth[r["id"]]}) + "\n" for r in records))
    out = tmp_path / "scores.json"
    assert eval_vqa.main(["--n-questions", "21", "--answers", str(answers), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["overall"] == 1.0
    assert "overall" in capsys.readouterr().out
