"""`blip3o world preview`: the page, the grid and the judge summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from blip3o.cli.main import main as blip3o_main


def test_preview_writes_page_grid_and_scores(tmp_path: Path, capsys) -> None:
    out = tmp_path / "preview"
    assert blip3o_main(["world", "preview", "--out", str(out), "--n", "6", "--seed", "3"]) == 0
    page = (out / "index.html").read_text()
    assert page.count("<div class='card'>") == 6
    assert page.count("judged_") == 24  # 24 evaluation prompts, 4 per category
    scores = json.loads((out / "judge_scores.json").read_text())
    assert scores["images"] == 24 and scores["overall"] == 1.0  # clean renders of the prompts themselves
    grid = Image.open(out / "grid.png")
    assert grid.width >= 8 * 150 and grid.height > 3 * 150
    assert "overall" in capsys.readouterr().out


def test_preview_rejects_bad_arguments(tmp_path: Path) -> None:
    assert blip3o_main(["world", "preview", "--out", str(tmp_path), "--n", "0"]) == 2
