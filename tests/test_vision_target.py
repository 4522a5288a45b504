"""bench/vision_target.py: the whitened token basis, the per-cell read-out and token judge, and a tiny run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip3o.train.scene_supervision import NO_OBJECT_COLOR, NO_OBJECT_SHAPE, scene_cell_labels
from blip3o.world.prompts import colors_record, two_object_record
from blip3o.world.sampler import sample_scene
from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH_DIR / "vision_target.py")


def label_tokens(scenes: list, grid: int = 4) -> torch.Tensor:
    """(N, T, 12) tokens that are each cell's one-hot shape and colour labels, zero for none. The last colour
    (black) is left out as well: with all 8, the colour columns would sum to the shape columns' sum, a
    rank-deficient design: with 2 threads and torch.use_deterministic_algorithms(True) (which a training test
    earlier in the same worker leaves on) least squares then read "object or none" right only 0.15 of the time.
    With 7 it is full rank with the read-out's intercept, so least squares fits the labels exactly."""
    rows = []
    for scene in scenes:
        shape, colour = scene_cell_labels(scene, grid)
        rows.append(
            torch.cat(
                [
                    F.one_hot(shape, NO_OBJECT_SHAPE + 1)[:, :-1],
                    F.one_hot(colour, NO_OBJECT_COLOR + 1)[:, :-2],
                ],
                1,
            )
        )
    return torch.stack(rows).float()


def test_token_basis_whitens_and_orders_components(bench) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(300, 16, 6, generator=gen) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    basis = bench.TokenBasis(tokens, components=3, fit_images=300)
    cut = basis(tokens).reshape(-1, 3)
    assert torch.allclose(torch.cov(cut.T), torch.eye(3), atol=1e-3)
    assert basis.explained(6) == pytest.approx(1.0)
    assert basis.explained(1) < basis.explained(2) < basis.explained(3) < 1.0


def test_readout_reads_label_tokens_and_the_judge_scores_them(bench) -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(200)]
    tokens = label_tokens(scenes)
    readout = bench.CellReadout(tokens, scenes, grid=4)
    assert readout.accuracy(tokens, scenes) == {
        "object_or_none": 1.0,
        "shape_at_objects": 1.0,
        "colour_at_objects": 1.0,
    }
    for scene, grid in zip(scenes, tokens, strict=True):  # every scene with no two objects in one cell
        cells = {(int(o.center[0] // 16), int(o.center[1] // 16)) for o in scene.objects}
        if len(cells) == len(scene.objects):
            found = sorted((d.shape, d.color) for d in readout.detections(grid, 64))
            assert found == sorted((o.shape, o.color) for o in scene.objects)
    # A token grid with one red circle passes "a red circle" and fails "a circle and a square".
    one = torch.zeros(1, 16, 12)
    one[0, 5, 0] = 1.0  # circle
    one[0, 5, NO_OBJECT_SHAPE] = 1.0  # red, the first colour
    records = [colors_record("circle", "red"), two_object_record("circle", "square")]
    judged = bench.token_judge(readout, one.expand(2, -1, -1), records, 64)
    assert judged["colors"] == 1.0 and judged["two_object"] == 0.0 and judged["overall"] == 0.5


def test_tiny_run_trains_samples_and_logs(bench, tmp_path: Path) -> None:
    save_untrained_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    bench.main(
        [str(tmp_path / "model"), "--scenes", "40", "--instruct", "0", "--steps", "3", "--eval-every", "2",
         "--batch", "4", "--prompts", "6", "--components", "8", "--sample-steps", "2", "--cfg", "3",
         "--decoder-steps", "2", "--decoder-batch", "2", "--decoder-sampling", "2:1", "3:3", "--threads", "1",
         "--out", str(out)]
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == [16, 8]
    assert 0.0 <= rows[0]["token_judge_real"]["overall"] <= 1.0
    assert [r["step"] for r in rows if "step" in r] == [2, 3]
    assert all(0.0 <= r["token_judge@3"]["overall"] <= 1.0 for r in rows if "step" in r)
    # Two decoder sampler settings: every row key and grid is tagged with its setting.
    decoded = rows[-1]
    assert decoded["decoder_step"] == 2
    assert {k for k in decoded if k != "decoder_step"} == {
        "round_trip@2x1", "end_to_end@3@2x1", "round_trip@3x3", "end_to_end@3@3x3"
    }  # fmt: skip
    assert all(0.0 <= v["geneval"] <= v["found"] <= 1.0 for k, v in decoded.items() if k != "decoder_step")
    for tag in ("@2x1", "@3x3"):
        assert (out / f"round_trip{tag}.png").exists() and (out / f"end_to_end_cfg3{tag}.png").exists()


def test_decoder_sampling_settings_parse_and_refuse_nonsense(bench) -> None:
    assert bench.sampler_setting("50:3") == (50, 3.0)
    assert bench.sampler_setting("10:1.5") == (10, 1.5)
    for bad in ("50", "0:3", "a:b", "50:3:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.sampler_setting(bad)
