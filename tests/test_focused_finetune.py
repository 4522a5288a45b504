"""bench/focused_finetune.py: the focused stage-1 fine-tune runs, logs both score rows and trains only the LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.world.language import QA_KINDS
from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "focused_finetune.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_pools_split_questions_by_kind(bench) -> None:
    focused, other, _ = bench.question_pools(12, {"relation"})
    assert focused and other
    relation_words = ("left of", "right of", "above", "below")
    assert all(answer in ("yes", "no") for _, _, answer in focused)
    assert all(any(w in question for w in relation_words) for _, question, _ in focused)
    assert not any(any(w in question for w in relation_words) for _, question, _ in other)


def test_where_questions_name_the_row_and_column_of_unique_objects(bench) -> None:
    _, other, pool = bench.question_pools(40, {"relation"})
    assert len(pool) > 40
    rows, cols = {"top", "middle", "bottom"}, {"left", "centre", "right"}
    for _, question, answer in pool:
        assert question.startswith("where is the ") and question.endswith("?")
        row, col = answer.split()
        assert row in rows and col in cols
    assert len({answer for _, _, answer in pool}) == 9  # every ninth of the canvas occurs
    # The same renders as the other pools: the first image of both is the same picture.
    assert np.array_equal(np.asarray(pool[0][0]), np.asarray(other[0][0]))  # scene 0 in both


def test_tiny_run_logs_scores_and_trains_only_the_language_model(bench, tmp_path: Path) -> None:
    save_untrained_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    bench.main(
        [str(tmp_path / "model"), "--scenes", "12", "--steps", "2", "--batch", "2", "--questions", "14",
         "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]
    for row in rows:
        assert set(row["per_kind"]) == set(QA_KINDS) and 0.0 <= row["overall"] <= 1.0
        assert sum(count for _, count in row["answers"]["relation"]) == 2  # 14 questions: 2 per kind
    before = Blip3o.from_pretrained(tmp_path / "model").backbone
    after = Blip3o.from_pretrained(out / "model").backbone
    pairs = zip(before.vision_tower.parameters(), after.vision_tower.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # frozen, as in the recipe's stage 1
    lm_changed = [
        not torch.equal(a, b)
        for (name, a), b in zip(before.named_parameters(), after.parameters(), strict=True)
        if "embed_tokens" in name
    ]
    assert any(lm_changed)
