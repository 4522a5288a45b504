"""bench/decoder_arms.py: one set of DiT samples drawn by several decoders and judged, a paired comparison."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from blip3o.models.decoder import PixelDecoder
from conftest import load_script, save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "decoder_arms.py"
FAST = ["--prompts", "6", "--steps", "2", "--decoder-steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


def test_the_same_decoder_named_twice_scores_the_same_on_the_same_samples(bench, tmp_path: Path) -> None:
    save_untrained_tiny_model(tmp_path / "m")
    grid = tmp_path / "arms.png"
    result = bench.main(
        [str(tmp_path / "m"), "--dec", str(tmp_path / "m"), str(tmp_path / "m" / "decoder"), *FAST,
         "--grid", str(grid), "--grid-per-category", "1"]
    )  # fmt: skip
    rows = list(result["arms"].values())
    assert len(rows) == 3 and result["prompts"] == 6
    assert {"found", "overall", "single_object"} <= set(rows[0])
    assert rows[0] == rows[1] == rows[2]  # decoder seed and DiT samples are shared by every arm
    with Image.open(grid) as picture:  # one row of 96-pixel cells per decoder, one column per category
        width, height = picture.size
    categories = len({k for k in rows[0] if k not in ("found", "overall")})
    assert width >= 96 * categories and height >= 3 * 96


def test_a_decoder_that_reads_other_features_or_no_folder_is_refused(bench, tmp_path: Path) -> None:
    model = save_untrained_tiny_model(tmp_path / "m")
    wide = PixelDecoder(replace(model.decoder.config, feature_dim=2 * model.decoder.config.feature_dim))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "m"), "--dec", str(tmp_path / "wide"), *FAST])
    with pytest.raises(SystemExit, match=r"no config\.json"):
        bench.main([str(tmp_path / "m"), "--dec", str(tmp_path / "missing"), *FAST])
