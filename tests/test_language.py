"""ShapesWorld language: every caption and answer is checked against the scene graph, recomputed here."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from blip3o.world.language import (
    QA_KINDS,
    annotate,
    color_question_shape,
    normalize_answer,
    relation_on_axis,
    relation_question_parts,
)
from blip3o.world.sampler import ObjectSpec, sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES, Scene, relations_between

# Written out here rather than imported, so the tests do not share the code's mistakes.
WORDS = ["zero", "one", "two", "three", "four"]
PLURAL = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
SINGULAR = {p: s for s, p in PLURAL.items()}
REL = r"(?:left of|right of|above|below)"


def annotated(seed: int, i: int):
    rng = np.random.default_rng([seed, i])
    scene = sample_scene(rng)
    return scene, annotate(scene, rng)


@pytest.fixture(scope="module")
def corpus():
    return [annotated(11, i) for i in range(400)]


def location(obj, size: int = 64) -> str:
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    col = ["left", "centre", "right"][min(int(cx // (size / 3)), 2)]
    row = ["top", "middle", "bottom"][min(int(cy // (size / 3)), 2)]
    return "in the centre" if (row, col) == ("middle", "centre") else f"in the {row} {col}"


def specified_scene(seed: int, specs: list[tuple[str, str]]) -> tuple[Scene, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return sample_scene(rng, [ObjectSpec(shape, color) for color, shape in specs]), rng


# ---------------------------------------------------------------------------------------------- captions


def test_short_caption_length_and_reserved_prefix(corpus):
    for _, ann in corpus:
        assert len(ann.short_caption.split()) <= 12, ann.short_caption
        assert "a photo of" not in ann.short_caption.lower()
        assert "a photo of" not in ann.long_caption.lower()


def test_short_caption_counts_every_group_with_number_words(corpus):
    for scene, ann in corpus:
        text = ann.short_caption
        groups = Counter((o.color, o.shape) for o in scene.objects)
        for (color, shape), n in groups.items():
            if n == 1:
                assert re.search(rf"\b{color} {shape}\b", text), (text, color, shape)
                assert not re.search(rf"\b(two|three|four) {color} {shape}", text)
            else:
                assert f"{WORDS[n]} {color} {PLURAL[shape]}" in text, (text, color, shape, n)
        # Nothing is named that is not there.
        named = re.findall(rf"\b({'|'.join(COLOR_NAMES)}) (\w+)", text)
        assert {(c, SINGULAR.get(s, s)) for c, s in named} == set(groups)


def test_short_caption_groups_identical_shapes():
    scene, rng = specified_scene(0, [("red", "circle"), ("blue", "star"), ("red", "circle")])
    text = annotate(scene, rng).short_caption
    assert "two red circles" in text and "blue star" in text
    scene, rng = specified_scene(1, [("green", "cross")] * 3)
    assert "three green crosses" in annotate(scene, rng).short_caption


def test_captions_use_several_templates(corpus):
    first_words = Counter(ann.short_caption.split()[0] for _, ann in corpus)
    openings = Counter(ann.long_caption.split(".")[0].split()[0] for _, ann in corpus)
    assert len(first_words) >= 5 and max(first_words.values()) < 0.5 * len(corpus)
    assert len(openings) >= 3


def test_long_caption_names_every_object_with_location(corpus):
    for scene, ann in corpus:
        sentences = ann.long_caption.split(". ")
        assert re.match(rf"^\w.* {WORDS[len(scene.objects)]} shapes?\b", sentences[0]), sentences[0]
        for obj in scene.objects:
            assert any(
                f"{obj.color} {obj.shape}" in s and location(obj) in s.lower() and not re.search(REL, s)
                for s in sentences
            ), (ann.long_caption, obj.color, obj.shape, location(obj))


def test_long_caption_states_exactly_the_relations_that_hold(corpus):
    checked = 0
    for scene, ann in corpus:
        combos = Counter((o.color, o.shape) for o in scene.objects)
        if any(n > 1 for n in combos.values()):
            continue  # descriptions then carry a location; the unique case is checked exhaustively here
        by_name = {f"{o.color} {o.shape}": o for o in scene.objects}
        pattern = rf"The (\w+ \w+) (?:is|lies|is placed) ({REL}(?: and {REL})?) the (\w+ \w+)\."
        stated = {}
        for x, rels, y in re.findall(pattern, ann.long_caption):
            stated[frozenset((x, y))] = (x, y, set(rels.split(" and ")))
        objs = list(by_name.items())
        for i, (na, a) in enumerate(objs):
            for nb, b in objs[i + 1 :]:
                holds = relations_between(a.box, b.box)
                claim = stated.get(frozenset((na, nb)))
                if not holds:
                    assert claim is None, ann.long_caption
                    continue
                assert claim is not None, (ann.long_caption, na, nb, holds)
                x, y, rels = claim
                assert rels == relations_between(by_name[x].box, by_name[y].box)
                checked += 1
    assert checked > 100


# --------------------------------------------------------------------------------------------- questions


def find_one(words: list[str], vocabulary) -> str | None:
    hits = [w for w in words if w in vocabulary]
    assert len(hits) <= 1, words
    return hits[0] if hits else None


def true_answer(scene: Scene, question: str, kind: str) -> str:
    """Answer the question from the scene graph, parsing it independently of the generator."""
    objs = scene.objects
    if kind == "relation":
        m = re.search(rf"the (\w+) (\w+) (?:is |positioned )?({REL}) the (\w+) (\w+)$", question.rstrip("?"))
        assert m, question
        ca, sa, rel, cb, sb = m.groups()
        a = [o for o in objs if (o.color, o.shape) == (ca, sa)]
        b = [o for o in objs if (o.color, o.shape) == (cb, sb)]
        assert len(a) == 1 and len(b) == 1, "relation asked about an ambiguous object"
        return "yes" if rel in relations_between(a[0].box, b[0].box) else "no"
    words = question.rstrip("?").split()
    color = find_one(words, COLOR_NAMES)
    shape = find_one(words, SHAPES)
    shapes_plural = find_one(words, SINGULAR)
    if kind == "color":
        matches = [o for o in objs if o.shape == shape]
        assert len(matches) == 1, "colour asked of a shape that is not unique"
        return matches[0].color
    if kind == "shape":
        matches = [o for o in objs if o.color == color]
        assert len(matches) == 1, "shape asked of a colour that is not unique"
        return matches[0].shape
    if kind == "count_total":
        return WORDS[len(objs)]
    if kind == "count_shape":
        return WORDS[sum(o.shape == SINGULAR[shapes_plural] for o in objs)]
    if kind == "count_color":
        return WORDS[sum(o.color == color for o in objs)]
    if kind == "exist":
        target = shape or SINGULAR[shapes_plural]
        present = any(o.shape == target and (color is None or o.color == color) for o in objs)
        return "yes" if present else "no"
    raise AssertionError(f"unknown kind {kind}")


def test_every_answer_is_true_for_the_scene(corpus):
    kinds = Counter()
    for scene, ann in corpus:
        assert 5 <= len(ann.qa) <= 8
        assert len({q.question for q in ann.qa}) == len(ann.qa)
        for q in ann.qa:
            assert q.kind in QA_KINDS
            assert re.fullmatch(r"[a-z]+", q.answer), q.answer
            assert q.answer == true_answer(scene, q.question, q.kind), (q, scene.objects)
            kinds[q.kind] += 1
    assert set(kinds) == set(QA_KINDS)


def test_yes_no_questions_are_balanced(corpus):
    for kind in ("exist", "relation"):
        answers = Counter(q.answer for _, ann in corpus for q in ann.qa if q.kind == kind)
        assert set(answers) == {"yes", "no"}
        assert 0.4 < answers["yes"] / sum(answers.values()) < 0.6, (kind, answers)


def test_count_answers_cover_zero_to_four(corpus):
    answers = {q.answer for _, ann in corpus for q in ann.qa if q.kind.startswith("count")}
    assert answers == set(WORDS)


def test_questions_use_several_templates(corpus):
    vocabulary = (
        r"\b("
        + "|".join([*COLOR_NAMES, *SHAPES, *SINGULAR, "left of", "right of", "above", "below"])
        + r")\b"
    )
    for kind in QA_KINDS:
        templates = {
            re.sub(vocabulary, "X", q.question) for _, ann in corpus for q in ann.qa if q.kind == kind
        }
        assert len(templates) >= 3, (kind, templates)


def test_annotation_is_deterministic():
    assert annotated(3, 17) == annotated(3, 17)
    assert annotated(3, 17)[1] != annotated(3, 18)[1]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Two.", "two"),
        ("2", "two"),
        ("0", "zero"),
        ("Stars", "star"),
        ("crosses!", "cross"),
        ("  The Red ", "red"),
        ("a circle", "circle"),
        ("Yes.", "yes"),
        ("red circles", "red circle"),
    ],
)
def test_normalize_answer(given, expected):
    assert normalize_answer(given) == expected


def test_normalize_answer_keeps_different_answers_different():
    assert normalize_answer("3") != normalize_answer("two")
    assert normalize_answer("no") != normalize_answer("yes")


def test_swap_shape_word_replaces_every_mention_of_one_shape_and_keeps_number():
    from blip3o.world.language import swap_shape_word

    rng = np.random.default_rng(0)
    caption = "two red crosses and a blue star. The blue star is left of the red cross across the way."
    seen = set()
    for _ in range(40):
        swapped = swap_shape_word(caption, rng)
        assert swapped != caption
        words = swapped.replace(".", "").split()
        if "star" not in words:  # star was swapped: both mentions changed, crosses untouched
            new = words[6]
            assert new != "star" and words[9] == new and words[2] == "crosses" and "across" in words
            seen.add(new)
        else:  # cross was swapped: plural stays plural, singular stays singular, "across" untouched
            assert "crosses" not in words and "cross" not in words and "across" in words
            assert words[2] in {"circles", "squares", "triangles", "stars"} and words[3] == "and"
    assert len(seen) >= 2
    assert swap_shape_word("a plain light background", rng) is None


def test_location_questions_place_each_unique_object_and_are_not_a_vqa_kind():
    from blip3o.world.language import location_questions, object_location

    rng = np.random.default_rng(4)
    specs = [ObjectSpec("circle", "red"), ObjectSpec("circle", "red"), ObjectSpec("star", "blue")]
    scene = sample_scene(rng, specs=specs)
    (qa,) = location_questions(scene)  # the two red circles cannot be named apart
    star = scene.objects[2]
    assert qa.question == "where is the blue star?" and qa.kind == "location"
    assert qa.answer == " ".join(object_location(star, scene.size))
    assert "location" not in QA_KINDS
    answers = Counter(q.answer for _ in range(300) for q in location_questions(sample_scene(rng)))
    assert len(answers) == 9 and all(len(a.split()) == 2 for a in answers)


def test_relation_and_colour_questions_parse_back_to_what_they_ask():
    parsed = {"relation": 0, "color": 0}
    for i in range(300):
        scene, ann = annotated(5, i)
        for qa in ann.qa:
            parts, shape = relation_question_parts(qa.question), color_question_shape(qa.question)
            assert (parts is not None) == (qa.kind == "relation"), qa.question
            assert (shape is not None) == (qa.kind == "color"), qa.question
            if parts is not None:
                colour_a, shape_a, relation, colour_b, shape_b = parts
                a, b = (
                    next(o for o in scene.objects if (o.color, o.shape) == (c, s))
                    for c, s in ((colour_a, shape_a), (colour_b, shape_b))
                )
                assert (relation in relations_between(a.box, b.box)) == (qa.answer == "yes")
                parsed["relation"] += 1
            if shape is not None:
                assert [o.color for o in scene.objects if o.shape == shape] == [qa.answer]
                parsed["color"] += 1
    assert min(parsed.values()) > 50, parsed


def test_relation_on_axis_decides_every_relation_answer_and_names_the_level_case():
    seen = Counter()
    for i in range(300):
        scene, ann = annotated(5, i)
        for qa in ann.qa:
            parts = relation_question_parts(qa.question)
            if parts is None:
                continue
            asked = parts[2]
            a, b = (
                next(o for o in scene.objects if (o.color, o.shape) == cs) for cs in (parts[:2], parts[3:])
            )
            truth = relation_on_axis(asked, relations_between(a.box, b.box))
            assert (truth == asked) == (qa.answer == "yes"), (qa.question, truth)
            seen[truth] += 1
    assert set(seen) == {"above", "below", "left of", "right of", "level with"}, seen
    assert relation_on_axis("below", {"left of"}) == "level with"
    assert relation_on_axis("left of", {"right of", "above"}) == "right of"
    with pytest.raises(ValueError, match="unknown relation"):
        relation_on_axis("near", set())


def test_axis_questions_twin_each_relation_question_with_the_order_that_decides_it():
    from blip3o.world.language import AXIS_ANSWERS, axis_questions

    twinned = 0
    for i in range(300):
        scene, ann = annotated(5, i)
        relation = [qa for qa in ann.qa if qa.kind == "relation"]
        twins = axis_questions(scene, [qa.question for qa in ann.qa])
        assert len(twins) == len(relation)
        for qa, twin in zip(relation, twins, strict=True):
            asked = relation_question_parts(qa.question)[2]
            assert twin.kind == "axis" and twin.kind not in QA_KINDS
            assert relation_question_parts(twin.question) is None  # never read as a relation question
            assert (twin.answer == AXIS_ANSWERS[asked]) == (qa.answer == "yes"), (qa, twin)
            assert ("left or right of" in twin.question) == (asked in ("left of", "right of"))
            twinned += 1
    assert twinned > 100
