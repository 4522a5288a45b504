"""bench/position_reading.py: where-questions and layer-by-layer position probes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blip3o.world.language import COLUMNS, ROWS
from conftest import load_script, save_untrained_tiny_model

BENCH = load_script(Path(__file__).resolve().parents[1] / "bench" / "position_reading.py")


def test_probe_reads_a_linear_label_and_not_a_random_one() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    features = np.eye(3)[labels] @ rng.normal(size=(3, 16)) + 0.1 * rng.normal(size=(600, 16))  # (600, 16)
    assert BENCH.probe_accuracy(features, labels, 3, fit=400) == 1.0
    shuffled = rng.permutation(labels)
    assert BENCH.probe_accuracy(features, shuffled, 3, fit=400) < 0.5


def test_items_name_a_unique_object_and_its_place() -> None:
    items = BENCH.where_items(40, seed=1, cell_px=16)  # 64-px renders: a 4 x 4 grid
    assert len(items) == 40
    for it in items:
        assert it["answer"] == f"{ROWS[it['row']]} {COLUMNS[it['col']]}"
        assert 0 <= it["cell"] < 16 and it["question"].startswith("where is the ")
    truth = [f"{ROWS[it['row']]} {COLUMNS[it['col']]}" for it in items]
    assert BENCH.answer_accuracy(items, truth)["row"] == BENCH.answer_accuracy(items, truth)["column"] == 1.0
    flipped = [f"{ROWS[it['row']]} {COLUMNS[2 - it['col']]}" for it in items]
    scored = BENCH.answer_accuracy(items, flipped)
    assert scored["row"] == 1.0 and scored["column"] == np.mean([it["col"] == 1 for it in items])


def test_bench_runs_on_a_tiny_model(tmp_path: Path, one_thread: None) -> None:
    model = save_untrained_tiny_model(tmp_path / "model")
    result = BENCH.main([str(tmp_path / "model"), "--scenes", "12", "--batch", "6", "--threads", "1"])
    layers = model.backbone.vlm.config.text_config.num_hidden_layers
    assert result["scenes"] == 12
    assert len(result["cell"]) == len(result["answer"]) == layers + 1
    assert len(result["last_layer_heads"]) == model.backbone.vlm.config.text_config.num_attention_heads
    assert result["tied_embeddings"] == model.backbone.vlm.config.tie_word_embeddings
    assert [row[i] for i, row in enumerate(result["column_word_cosine"])] == [1.0, 1.0, 1.0]
