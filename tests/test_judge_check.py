"""Prompt-level judge acceptance on a small sample (bench/judge_acceptance.py measures 2,000 renders)."""

from __future__ import annotations

from blip3o.eval.judge_check import near_miss_specificity, prompt_accuracy
from blip3o.world.prompts import CATEGORIES


def test_judge_accepts_renders_of_the_prompt() -> None:
    summary = prompt_accuracy(n=240, seed=11)
    assert set(summary["categories"]) == set(CATEGORIES)
    assert all(c["images"] == 40 for c in summary["categories"].values())
    assert summary["overall"] >= 0.995, summary["failures"]
    assert min(c["accuracy"] for c in summary["categories"].values()) >= 0.975


def test_judge_accepts_degraded_renders() -> None:
    summary = prompt_accuracy(n=240, seed=12, degraded=True)
    assert summary["overall"] >= 0.97, summary["failures"]


def test_judge_rejects_near_misses() -> None:
    summary = near_miss_specificity(n=240, seed=13)
    assert summary["overall"] >= 0.99, summary["wrongly_accepted"]
    assert set(summary["by_kind"]) == {"color", "count", "shape", "relation"}


def test_a_detector_that_sees_nothing_fails_everything() -> None:
    """The check can fail: a judge that finds nothing scores 0 on accuracy and 1 on specificity."""
    assert prompt_accuracy(n=60, seed=1, detect=lambda image: [])["overall"] == 0.0
    assert near_miss_specificity(n=60, seed=1, detect=lambda image: [])["overall"] == 1.0
