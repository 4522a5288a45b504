"""bench/vqa_errors.py: the ShapesVQA error breakdown and the vision tokens' class variance shares."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip3o.eval.vqa import VQA_QUESTIONS, vqa_scene, vqa_set
from conftest import load_script

BENCH = load_script(Path(__file__).resolve().parents[1] / "bench" / "vqa_errors.py")


def test_breakdown_counts_right_answers_and_names_the_wrong_ones() -> None:
    items = vqa_set(VQA_QUESTIONS)[:140]
    scenes = {it.image_index: vqa_scene(it.image_index, it.seed) for it in items}
    answers = {it.id: it.answer for it in items}  # all right...
    colour = next(it for it in items if it.kind == "color" and len(scenes[it.image_index].objects) > 1)
    other = next(o.color for o in scenes[colour.image_index].objects if o.color != colour.answer)
    answers[colour.id] = other  # ...but one colour, named as another object's
    relation = next(it for it in items if it.kind == "relation")
    flipped = "no" if relation.answer == "yes" else "yes"
    answers[relation.id] = flipped
    out = BENCH.error_breakdown(items, answers, scenes)
    asked = sum(t for kind in out["by_objects"].values() for _, t in kind.values())
    right = sum(r for kind in out["by_objects"].values() for r, _ in kind.values())
    assert (asked, right) == (140, 138)
    assert out["wrong"]["color"] == {"another object's colour": 1}
    assert out["wrong"]["relation"] == {f"said {flipped} for {relation.answer}": 1}
    assert sum(t for _, t in out["relation_axis"].values()) == sum(it.kind == "relation" for it in items)


def test_class_variance_share_is_one_for_pure_class_means_and_small_for_noise() -> None:
    labels = torch.arange(4).repeat(50)  # (200,)
    means = torch.randn(4, 8)
    assert BENCH.class_variance_share(means[labels], labels) == pytest.approx(1.0)
    noise = torch.randn(200, 8)
    assert BENCH.class_variance_share(noise, labels) < 0.1
    mixed = means[labels] + noise * means.std()  # class and noise of about equal size
    assert 0.2 < BENCH.class_variance_share(mixed, labels) < 0.8
