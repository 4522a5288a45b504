"""Half-precision storage of a whole model (what keeps the bundled model under 25 MB) and the bundled model as
the default of `blip3o generate` / `blip3o ask`. The bundled folder is monkeypatched to tiny models in
tmp_path: no weights are committed with the code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o import bundled
from blip3o.cli import ask, generate
from blip3o.models.blip3o import Blip3o, ModelLoadError
from conftest import save_untrained_tiny_model

FAST = ["--steps", "2", "--decoder-steps", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One untrained tiny model saved twice: float32 and float16 storage."""
    root = tmp_path_factory.mktemp("bundled")
    model = save_untrained_tiny_model(root / "fp32")
    model.save_pretrained(root / "fp16", dtype=torch.float16)
    return root / "fp32", root / "fp16"


def test_float16_storage_halves_the_files_and_loads_as_float32(folders: tuple[Path, Path]) -> None:
    fp32_dir, fp16_dir = folders
    ratio = _weight_bytes(fp16_dir) / _weight_bytes(fp32_dir)
    assert 0.45 < ratio < 0.55, ratio  # measured 0.504 (vectors and scalars stay float32)
    assert json.loads((fp16_dir / "config.json").read_text())["storage_dtype"] == "float16"
    assert json.loads((fp32_dir / "config.json").read_text())["storage_dtype"] == "float32"

    full, half = Blip3o.from_pretrained(fp32_dir), Blip3o.from_pretrained(fp16_dir)
    a, b = full.state_dict(), half.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key  # upcast on load: nothing downstream sees float16
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        # Round to nearest float16: relative error <= 2^-11 for normal values, <= 2^-25 absolute for
        # subnormal ones (|x| < 2^-14).
        bound = a[key].abs() * 2.0**-11 + 2.0**-24
        assert ((a[key] - b[key]).abs() <= bound).all(), key

    kw = {"num_images": 2, "steps": 2, "decoder_steps": 2, "seed": 5}
    prompts = ["a red circle left of a blue square", "two green triangles"]
    diffs = [
        np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        for x, y in zip(full.generate(prompts, **kw), half.generate(prompts, **kw), strict=True)
    ]
    # Measured on this model: at most 1 grey level off, 0.014 on average (also with 30 + 20 steps).
    assert max(d.max() for d in diffs) <= 4
    assert np.mean([d.mean() for d in diffs]) <= 0.1


def test_storage_dtype_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    model = Blip3o.from_pretrained(folders[0])
    with pytest.raises(ValueError, match="weights can be stored as"):
        model.save_pretrained(tmp_path / "int8", dtype=torch.int8)
    config = json.loads((folders[1] / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "storage_dtype": "float8"}))
    with pytest.raises(ModelLoadError, match="unknown storage_dtype 'float8'"):
        Blip3o.from_pretrained(bad)


# ------------------------------------------------------------------------------------- the bundled model


def test_bundled_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This checkout: the folder the package would carry, inside the installed package.
    assert bundled.model_path() == Path(bundled.__file__).parent / "model"
    monkeypatch.setattr(bundled, "model_path", lambda: tmp_path / "model")
    with pytest.raises(bundled.NoBundledModelError, match="no bundled model in this install; pass --model"):
        bundled.bundled_model_dir()
    (tmp_path / "model").mkdir()  # a folder without config.json is not a model
    with pytest.raises(bundled.NoBundledModelError):
        bundled.bundled_model_dir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert bundled.bundled_model_dir() == tmp_path / "model"


def test_generate_and_ask_default_to_the_bundled_model(
    folders: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fp16_dir = folders[1]
    monkeypatch.setattr(bundled, "model_path", lambda: fp16_dir)
    out = tmp_path / "bundled.png"
    assert generate.main(["a red circle", "-o", str(out), "--seed", "3", *FAST]) == 0
    capsys.readouterr()
    explicit = tmp_path / "explicit.png"
    assert (
        generate.main(["a red circle", "--model", str(fp16_dir), "-o", str(explicit), "--seed", "3", *FAST])
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(explicit)))

    capsys.readouterr()
    assert ask.main([str(out), "what colour is the circle?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("\n") == 1

    # No bundled model and no --model: the message says what to do, one line, exit 2.
    monkeypatch.setattr(bundled, "model_path", lambda: tmp_path / "absent")
    for main, args in ((generate.main, ["x", "-o", str(tmp_path / "o.png")]), (ask.main, [str(out), "q"])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no bundled model in this install; pass --model PATH" in err


def test_the_bundled_model_if_any_fits_and_loads() -> None:
    """Guards the shipped model (skipped until one is bundled): at most 25 MB of weights, and it loads."""
    try:
        folder = bundled.bundled_model_dir()
    except bundled.NoBundledModelError:
        pytest.skip("no bundled model in this checkout yet")
    assert _weight_bytes(folder) <= 25_000_000, f"{_weight_bytes(folder)} bytes of safetensors in {folder}"
    model = Blip3o.from_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
