"""bench/relation_reading.py: position outcomes by relation, and the resampler read-out of relation words."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import load_script, tiny_object_label_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "relation_reading.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


@pytest.fixture(scope="module")
def model():
    from blip3o.models.blip3o import Blip3o, tiny_config

    config = tiny_config(tokenizer_corpus_scenes=200)
    return Blip3o.from_config(replace(config, dit=replace(config.dit, condition_slots=3)), seed=0).eval()


def test_outcomes_sort_each_position_image_by_what_went_wrong(bench, tmp_path: Path) -> None:
    rows = [
        ("a photo of a circle left of a star", True, ""),
        ("a photo of a circle left of a star", False, "expected circle left of star, found right of"),
        ("a photo of a circle left of a star", False, "expected circle left of star, found above"),
        ("a photo of a star below a square", False, "expected 1 square, found 0"),
        ("a photo of a star below a square", False, "expected star below square, found above"),
        ("a photo of a circle", True, ""),  # not a position prompt: not counted
    ]
    for seed, chunk in enumerate((rows[:3], rows[3:])):
        folder = tmp_path / f"seed_{seed}"
        folder.mkdir()
        lines = [
            json.dumps({"tag": "position" if " of a " in p[11:] or "below" in p else "single_object",
                        "prompt": p, "correct": ok, "reason": reason})
            for p, ok, reason in chunk
        ]  # fmt: skip
        (folder / "geneval_results.jsonl").write_text("\n".join(lines) + "\n")
    outcomes = bench.relation_outcomes(tmp_path)
    assert dict(outcomes["left of"]) == {"right": 1, "same axis, wrong side": 1, "other axis": 1}
    assert dict(outcomes["below"]) == {"missing": 1, "same axis, wrong side": 1}
    assert sum(outcomes["right of"].values()) == sum(outcomes["above"].values()) == 0
    with pytest.raises(FileNotFoundError):
        bench.relation_outcomes(tmp_path / "seed_0")
    assert bench.main(["outcomes", str(tmp_path)]) == {r: dict(c) for r, c in outcomes.items()}
    assert bench.classify("a photo of a star above a circle", False, "expected 1 star, found 0") == (
        "above",
        "missing",
    )


def test_memories_hold_the_queries_or_the_prompt_too(bench, model) -> None:
    prompts = ["a photo of a star left of a circle", "a photo of a big red circle above a small blue star"]
    n_queries = model.backbone.config.n_queries
    queries, ignore = bench.memories(model, prompts, "queries")
    assert queries.shape[:2] == (2, n_queries) and not ignore.any()
    with torch.no_grad():
        torch.testing.assert_close(queries, model.condition(prompts).float(), rtol=1e-5, atol=1e-5)
    words, ignore = bench.memories(model, prompts, "prompt-words")
    inputs = model.backbone.generation_inputs(prompts)
    assert words.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(ignore, inputs["attention_mask"] == 0)  # the shorter prompt's left padding is ignored
    embed = model.backbone.vlm.model.language_model.embed_tokens
    with torch.no_grad():
        torch.testing.assert_close(words[1, :-n_queries], embed(inputs["input_ids"][1, :-n_queries]))
    torch.testing.assert_close(words[:, -n_queries:], queries)


def test_readout_reports_each_relation_on_held_out_and_eval_prompts(bench, model) -> None:
    kept, held, evaluation = bench.split_prompts()
    assert len(evaluation) == 80 and not set(evaluation) & (set(kept) | set(held))  # the eval's own prompts
    assert (
        not set(held) & set(kept)
        and held
        and all(" of a " in p or "above" in p or "below" in p for p in held)
    )
    rows = bench.readout(model, "queries", steps=2, lr=1e-3)
    assert [r["step"] for r in rows] == [2]
    accuracies = {k: v for k, v in rows[0].items() if k.startswith(("held", "eval"))}
    assert len(accuracies) == 8 and all(0.0 <= v <= 1.0 for v in accuracies.values())


def test_token_outcomes_judge_every_eval_position_prompt_once_per_seed(bench, tmp_path: Path) -> None:
    model = tiny_object_label_model(corpus_scenes=200).eval()
    outcomes = bench.token_outcomes(model, [0, 1], cfg_scale=1.0)
    assert {r: sum(c.values()) for r, c in outcomes.items()} == dict.fromkeys(outcomes, 40)
    assert set().union(*outcomes.values()) <= {"right", "same axis, wrong side", "other axis", "missing"}
    model.save_pretrained(tmp_path / "model")  # the command line reaches the same judge
    printed = bench.main(["tokens", str(tmp_path / "model"), "--seeds", "0", "--threads", "1"])
    assert {r: sum(c.values()) for r, c in printed.items()} == dict.fromkeys(outcomes, 20)
