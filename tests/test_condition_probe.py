"""bench/condition_probe.py: ridge probes of the prompt facts in the generation condition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blip3o.world.scene import COLOR_NAMES, NUMBER_WORDS, RELATIONS, SHAPES
from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "condition_probe.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def test_labels_are_the_facts_the_prompts_state(bench) -> None:
    facts = bench.probe_prompts()
    assert all(len(prompts) == len(labels) == len(groups) for prompts, labels, _, groups in facts.values())
    prompts, labels, classes, groups = facts["count"]
    assert all(SHAPES[g] in p for p, g in zip(prompts, groups, strict=True))
    assert classes == 3 and all(
        f" {NUMBER_WORDS[(2, 3, 4)[y]]} " in f" {p} " for p, y in zip(prompts, labels, strict=True)
    )
    prompts, labels, _, _ = facts["relation"]
    assert all(f" {RELATIONS[y]} " in p for p, y in zip(prompts, labels, strict=True))
    prompts, labels, _, _ = facts["subject"]  # the placed shape is named before the relation
    assert all(p.split(RELATIONS[r])[0].rstrip().endswith(SHAPES[y]) for p, y, r in
               zip(prompts, labels, facts["relation"][1], strict=True))  # fmt: skip
    prompts, labels, classes, _ = facts["first colour"]
    assert classes == len(COLOR_NAMES)
    assert all(
        p.split(" and ")[0].split()[-2] == COLOR_NAMES[y] for p, y in zip(prompts, labels, strict=True)
    )


def test_probe_reads_a_linear_fact_and_not_noise(bench) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=300)
    signal = np.eye(4)[labels] @ rng.normal(size=(4, 50)) + 0.1 * rng.normal(size=(300, 50))  # (300, 50)
    assert bench.probe(signal, labels, 4, seed=0) == 1.0
    noise = rng.normal(size=(300, 2000))  # wider than the prompts: the dual form
    assert bench.probe(noise, labels, 4, seed=0) < 0.45  # chance 0.25; 60 held-out rows


def test_a_group_split_cannot_recall_what_only_identifies_a_group(bench) -> None:
    groups = np.repeat(np.arange(20), 15)  # 20 groups of 15 prompts
    labels = groups % 3  # the label is a property of the group alone
    features = np.eye(20)[groups] + 0.01 * np.random.default_rng(0).normal(
        size=(300, 20)
    )  # (300, 20): which group
    assert bench.probe(features, labels, 3, seed=0) == 1.0  # prompts of every group were fit
    assert bench.probe(features, labels, 3, seed=0, groups=groups) < 0.6  # test groups never seen


def test_representations_of_a_tiny_model_have_the_documented_widths(bench, tmp_path: Path) -> None:
    model = save_untrained_tiny_model(tmp_path / "m")
    reps = bench.representations(model, ["a photo of two stars", "a photo of a red circle and a blue star"])
    hidden, queries = model.config.backbone.hidden_size, model.config.backbone.n_queries
    assert {k: v.shape for k, v in reps.items()} == {
        "words": (2, hidden), "prompt states": (2, hidden), "queries mean": (2, hidden), "queries": (2, queries * hidden),
    }  # fmt: skip
    condition = model.condition(["a photo of two stars"]).detach().numpy()  # (1, Q, H)
    np.testing.assert_allclose(reps["queries"][:1], condition.reshape(1, -1), rtol=1e-5, atol=1e-5)


def test_a_model_with_a_condition_resampler_also_gives_its_slots(bench) -> None:
    from dataclasses import replace

    from blip3o.models.blip3o import Blip3o, tiny_config

    config = tiny_config(tokenizer_corpus_scenes=200)
    model = Blip3o.from_config(replace(config, dit=replace(config.dit, condition_slots=3)), seed=0).eval()
    prompts = ["a photo of a star left of a circle", "a photo of a red circle and a blue star"]
    reps = bench.representations(model, prompts)
    width = model.config.dit.latent_embedding_size
    assert reps["slots"].shape == (2, 3 * width) and reps["slots 1-2"].shape == (2, 2 * width)
    slots = model.dit.resample_condition(model.condition(prompts).float()).detach().numpy()  # (2, 3, W)
    np.testing.assert_allclose(reps["slots"], slots.reshape(2, -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reps["slots 1-2"], slots[:, :2].reshape(2, -1), rtol=1e-4, atol=1e-5)
