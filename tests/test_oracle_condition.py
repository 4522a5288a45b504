"""bench/oracle_condition.py: the exact scene condition, and a tiny end-to-end run (train, sample, judge, log)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "oracle_condition.py"


@pytest.fixture(scope="module")
def oracle():
    return load_script(BENCH)


def _scene(*objects: tuple[str, str, tuple[float, float, float, float]]) -> SimpleNamespace:
    return SimpleNamespace(objects=[SimpleNamespace(shape=s, color=c, box=b) for s, c, b in objects])


def test_scene_condition_marks_the_objects_cell_with_its_shape_and_colour(oracle) -> None:
    condition = oracle.SceneCondition(width=16, image_size=63)  # cells of 21 px
    empty = condition(_scene())
    assert torch.equal(empty, condition.cell)
    # A red circle centred in the top-right cell (x 52, y 10) and a blue star in the centre cell.
    tokens = condition(_scene(("circle", "red", (46, 4, 58, 16)), ("star", "blue", (25, 25, 37, 37))))
    changed = (tokens != empty).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 4]
    shape, color = oracle.SHAPES.index("circle"), oracle.COLOR_NAMES.index("red")
    assert torch.allclose(tokens[2] - empty[2], condition.shape[shape] + condition.color[color])
    # Same objects, same condition; another colour, another condition.
    assert torch.equal(
        tokens, condition(_scene(("circle", "red", (46, 4, 58, 16)), ("star", "blue", (25, 25, 37, 37))))
    )
    assert not torch.equal(
        tokens, condition(_scene(("circle", "green", (46, 4, 58, 16)), ("star", "blue", (25, 25, 37, 37))))
    )


def test_tiny_run_trains_samples_and_logs(oracle, tmp_path: Path) -> None:
    save_untrained_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    argv = [str(tmp_path / "model"), "--scenes", "40", "--steps", "3", "--eval-every", "2", "--prompts", "6"]
    oracle.main(
        [
            *argv,
            "--batch",
            "4",
            "--components",
            "8",
            "--sample-steps",
            "2",
            "--decoder-steps",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # every 2 steps, then the last
    for row in rows:
        assert all(0.0 <= row[f"{k}@{s}"] <= 1.0 for k in ("found", "geneval") for s in ("1", "3"))
        assert row["loss"] > 0
    assert (out / "step_000003_cfg3.png").exists()
    # The model's own condition instead of the scene encoding: same loop, its (B, 64, H) query states.
    oracle.main([*argv, "--batch", "4", "--components", "0", "--condition", "model", "--sample-steps", "1",
                 "--decoder-steps", "1", "--cfg", "3", "--threads", "1", "--out", str(tmp_path / "real")])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "real" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and set(rows[0]) == {"step", "loss", "found@3", "geneval@3"}
