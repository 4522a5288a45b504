"""world/reasoning.py (relation answers with their steps, the final answer of a reply) and where the recipe
uses it: make_batch's relation_steps / relation_share, StageConfig's checks, ShapesVQA's scorer, `blip3o ask`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from blip3o.cli import ask
from blip3o.eval.vqa import score_answers, vqa_set
from blip3o.train.config import ConfigError
from blip3o.train.data import DataError, Example, make_batch
from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import preset
from blip3o.world.language import annotate, relation_question_parts
from blip3o.world.reasoning import final_answer, relation_steps, spelled_relation
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene

SCENE = sample_scene(np.random.default_rng(0))  # blue triangle top right, red square middle right


def test_relation_steps_write_places_and_the_axis_truth_before_the_answer() -> None:
    left = "is the blue triangle left of the red square?"  # neither left of nor right of holds
    assert relation_steps(left, "no", SCENE, truth=True) == (
        "blue triangle top right, red square middle right, blue triangle level with red square, so no"
    )
    below = "is the blue triangle below the red square?"
    assert relation_steps(below, "no", SCENE, truth=True) == (
        "blue triangle top right, red square middle right, blue triangle above red square, so no"
    )
    assert relation_steps(below, "no", SCENE) == "blue triangle top right, red square middle right, so no"
    assert relation_steps("what colour is the square?", "red", SCENE, truth=True) == "red"


def test_relation_compare_writes_the_asked_relation_last_and_needs_the_truth() -> None:
    below = "is the blue triangle below the red square?"
    assert relation_steps(below, "no", SCENE, truth=True, compare=True) == (
        "blue triangle top right, red square middle right, blue triangle above red square, asked below, so no"
    )
    above = "is the blue triangle above the red square?"
    assert final_answer(relation_steps(above, "yes", SCENE, truth=True, compare=True)) == "yes"
    assert relation_steps("what colour is the square?", "red", SCENE, truth=True, compare=True) == "red"
    with pytest.raises(ValueError, match="truth"):
        relation_steps(below, "no", SCENE, compare=True)


def test_relation_canonical_asks_the_way_round_whose_relation_is_above_or_left_of() -> None:
    below = "is the blue triangle below the red square?"  # = is the red square above the blue triangle?
    assert spelled_relation(below, "no", SCENE, "canonical") == (
        "red square middle right, blue triangle top right, red square below blue triangle, so no"
    )
    above = "is the blue triangle above the red square?"  # already that way round: as the truth form
    assert spelled_relation(above, "yes", SCENE, "canonical") == spelled_relation(
        above, "yes", SCENE, "truth"
    )
    # on many scenes the answer is a function of the written relation alone: yes where it is above / left of
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(300):
        scene = sample_scene(rng)
        for qa in annotate(scene, rng).qa:
            if relation_question_parts(qa.question) is None:
                continue
            written = spelled_relation(qa.question, qa.answer, scene, "canonical").split(", ")[2]
            assert qa.answer == ("yes" if " above " in written or " left of " in written else "no")
            checked += 1
    assert checked > 100
    with pytest.raises(ValueError, match="truth step alone"):
        relation_steps(below, "no", SCENE, truth=True, compare=True, canonical=True)
    with pytest.raises(ValueError, match="unknown relation form"):
        spelled_relation(below, "no", SCENE, "sideways")


def test_final_answer_is_what_follows_the_last_so() -> None:
    assert final_answer("blue triangle top right, red square middle right, so no") == "no"
    assert final_answer("red") == "red" and final_answer("") == ""
    assert final_answer("a, so b, so yes") == "yes"


def test_score_answers_reads_the_final_answer_of_a_reply_with_steps() -> None:
    items = vqa_set(14)
    spelled = {it.id: f"someone somewhere, so {it.answer}" for it in items}
    assert score_answers(items, spelled)["overall"] == 1.0
    cut = {it.id: "someone somewhere, so" for it in items}  # cut off before its answer: wrong
    assert score_answers(items, cut)["overall"] == 0.0


def _examples(n: int = 12) -> list[Example]:
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(n)]
    anns = [annotate(s, rng) for s in scenes]
    return [
        Example(render(s), a.short_caption, a.long_caption, [(q.question, q.answer) for q in a.qa], s)
        for s, a in zip(scenes, anns, strict=True)
    ]


def _turns(batch: dict) -> list[tuple[str, str]]:
    return [
        pair
        for prompt, answer in zip(batch["prompts"], batch["answers"], strict=True)
        for pair in (zip(prompt, answer, strict=True) if isinstance(prompt, list) else [(prompt, answer)])
    ]


def test_make_batch_spells_out_relation_answers_and_leaves_the_rest() -> None:
    examples = _examples()
    rows, positions = list(range(12)) * 4, list(range(48))
    plain = make_batch(
        "understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=1.0, qa_turns=8
    )
    spelled = make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=1.0,
                         qa_turns=8, relation_steps=True)  # fmt: skip
    pairs = list(zip(_turns(plain), _turns(spelled), strict=True))
    relations = [(p, s) for p, s in pairs if relation_question_parts(p[0]) is not None]
    assert relations and all(s[1].count(", ") == 3 and final_answer(s[1]) == p[1] for p, s in relations)
    assert all(p == s for p, s in pairs if relation_question_parts(p[0]) is None)
    compared = make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=1.0,
                          qa_turns=8, relation_steps=True, relation_form="compare")  # fmt: skip
    for (_, (_, s)), (q, c) in zip(pairs, _turns(compared), strict=True):
        parts = relation_question_parts(q)
        assert c == (s if parts is None else s.replace(", so ", f", asked {parts[2]}, so "))
    with pytest.raises(ValueError, match="give relation_steps"):
        make_batch(
            "understanding", examples, rows, positions, seed=0, short_prob=0.3, relation_form="compare"
        )
    with pytest.raises(DataError, match="relation_steps needs the scene"):
        make_batch("understanding", [dataclasses.replace(e, scene=None) for e in examples], rows, positions,
                   seed=0, short_prob=0.3, relation_steps=True)  # fmt: skip


def test_relation_share_keeps_only_relation_questions_at_its_chance() -> None:
    examples = _examples()
    has_relation = [i for i, e in enumerate(examples) if any(relation_question_parts(q) for q, _ in e.qa)]
    rows = has_relation * 20
    positions = list(range(len(rows)))

    def batch(share: float) -> dict:
        return make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=1.0,
                          qa_turns=8, relation_share=share)  # fmt: skip

    assert batch(0.0) == make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3,
                                    qa_share=1.0, qa_turns=8)  # fmt: skip
    only = batch(1.0)
    assert all(relation_question_parts(q) is not None for q, _ in _turns(only))
    some = batch(0.5)
    relation_only = np.mean([all(relation_question_parts(q) for q in p) for p in some["prompts"]])
    assert 0.35 < relation_only < 0.75  # about half, plus conversations that drew relations alone anyway


def test_stage_config_takes_relation_options_on_understanding_stages_only() -> None:
    config = apply_overrides(
        preset("tiny-test"),
        ["stages.understanding.relation_steps=true", "stages.understanding.relation_share=0.3"],
    )
    assert (
        config.stage("understanding").relation_steps and config.stage("understanding").relation_share == 0.3
    )
    with pytest.raises(ConfigError, match="relation_steps"):
        apply_overrides(preset("tiny-test"), ["stages.generation.relation_steps=true"])
    with pytest.raises(ConfigError, match="relation_share"):
        apply_overrides(preset("tiny-test"), ["stages.understanding.relation_share=1.5"])
    with pytest.raises(ConfigError, match="set relation_steps too"):
        apply_overrides(preset("tiny-test"), ["stages.understanding.relation_form=compare"])
    with pytest.raises(ConfigError, match="relation_form must be one of"):
        apply_overrides(preset("tiny-test"), ["stages.understanding.relation_steps=true",
                                              "stages.understanding.relation_form=sideways"])  # fmt: skip
    canonical = ["stages.understanding.relation_steps=true", "stages.understanding.relation_form=canonical"]
    assert apply_overrides(preset("tiny-test"), canonical).stage("understanding").relation_form == "canonical"


class _SpellingModel:
    """Stands in for a loaded model: every reply writes a step before its answer."""

    def understand(self, images, prompts, max_new_tokens):
        return ["red circle top left, so yes" for _ in prompts]


def test_ask_prints_the_final_answer_and_the_steps_when_asked(tmp_path, monkeypatch, capsys) -> None:
    render(SCENE).save(tmp_path / "scene.png")
    monkeypatch.setattr(ask, "load_model", lambda model, device: _SpellingModel())
    monkeypatch.setattr(ask, "check_prompts", lambda model, prompts: None)
    assert ask.main([str(tmp_path / "scene.png"), "is the red circle left of the blue star?"]) == 0
    assert capsys.readouterr().out == "yes\n"
    assert ask.main([str(tmp_path / "scene.png"), "is the red circle left of the blue star?", "--steps"]) == 0
    assert capsys.readouterr().out == "red circle top left, so yes\n"
