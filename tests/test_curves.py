"""`blip3o curves`: CSV + PNG from a run's logs, reference overlay, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from blip3o.cli.main import main as blip3o_main
from blip3o.eval.curves import read_csv, read_run


def _fake_run(root: Path, scale: float = 1.0) -> Path:
    (root / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"stages": [{"name": "clip"}, {"name": "generation"}]}))
    for stage in ("generation", "clip"):  # written out of order: the config's order must win
        (root / stage).mkdir(parents=True, exist_ok=True)
        lines = [
            {"step": s, "loss": scale * 2.0 / s, "grad_norm": 1.0, "lr": 1e-4, "samples_per_s": 10.0}
            for s in (1, 2, 4)
        ]
        (root / stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_curves_round_trip_and_plot(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run")
    reference = _fake_run(tmp_path / "ref", scale=1.5)
    assert blip3o_main(["curves", str(reference), "--out", str(tmp_path / "ref_curves")]) == 0
    out = tmp_path / "curves"
    args = ["curves", str(run), "--out", str(out), "--reference", str(tmp_path / "ref_curves" / "curves.csv")]
    assert blip3o_main(args) == 0
    assert list(read_run(run)) == ["clip", "generation"]
    back = read_csv(out / "curves.csv")
    assert back["generation"][2] == {
        "step": 4,
        "loss": 0.5,
        "grad_norm": 1.0,
        "lr": 1e-4,
        "samples_per_s": 10.0,
    }
    assert Image.open(out / "curves.png").width > 400


def test_curves_errors(tmp_path: Path) -> None:
    assert blip3o_main(["curves", str(tmp_path)]) == 2  # no logs
    run = _fake_run(tmp_path / "run")
    (tmp_path / "bad.csv").write_text("stage,step,loss\n")
    assert blip3o_main(["curves", str(run), "--reference", str(tmp_path / "bad.csv")]) == 2
