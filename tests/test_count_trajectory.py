"""bench/count_trajectory.py: where along the sampler's trajectory a counting sample's count is decided."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from conftest import load_script, tiny_object_label_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "count_trajectory.py"


def test_each_wanted_count_is_followed_step_by_step(tmp_path: Path) -> None:
    bench = load_script(BENCH)
    tiny_object_label_model().save_pretrained(tmp_path / "object")
    result = bench.main([str(tmp_path / "object"), "--seeds", "2", "--every", "2", "--threads", "1"])
    assert result["samples"] == 30  # 15 counting prompts x 2 seeds
    assert set(result["by_count"]) == {"2", "3", "4"}
    for want, entry in result["by_count"].items():
        assert sum(entry["final_counts"].values()) == 10
        assert entry["final_pass"] == entry["final_counts"].get(int(want), 0)
        steps = entry["steps"]
        assert steps[0]["step"] == 0 and steps[0]["sigma"] == 1.0
        assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)
        assert all(a["sigma"] > b["sigma"] for a, b in itertools.pairwise(steps))
        for row in steps:
            # the mean absolute error bounds the mean's error (a count read per sample, not per mean)
            assert row["abs_error"] >= abs(row["soft_mean"] - int(want)) - 1e-6
            assert 0 <= row["rounds_to_wanted"] <= 10 and 0 <= row["rounds_to_final"] <= 10


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    bench = load_script(BENCH)
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "missing"), "--seeds", "0"])
