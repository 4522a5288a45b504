"""int8 storage of the DiT's matrices (`blip3o.models.int8_storage`, `save_pretrained(dit_int8=True)`): the
rounding bound, what stays as it was, the saved folder's size and what loads from it, and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip3o.models.blip3o import Blip3o, ModelLoadError
from blip3o.models.int8_storage import MIN_ELEMENTS, SCALE_SUFFIX, dequantize_state, quantize_state
from conftest import save_untrained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_trip_within_half_a_step_per_row() -> None:
    torch.manual_seed(0)
    matrix = torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    matrix[5] = 0.0  # a gated-off row stays exactly zero
    conv = torch.randn(32, 8, 4, 4)  # 4,096 elements: quantized per output channel
    state = {"w": matrix, "conv": conv, "bias": torch.randn(4096), "small": torch.randn(8, 8)}
    stored = quantize_state(state)
    assert stored["w"].dtype == torch.int8 and stored["conv"].dtype == torch.int8
    assert stored["w" + SCALE_SUFFIX].shape == (64,) and stored["w" + SCALE_SUFFIX].dtype == torch.float32
    # Vectors and matrices under MIN_ELEMENTS are not touched.
    assert stored["bias"] is state["bias"] and stored["small"] is state["small"]
    assert state["small"].numel() < MIN_ELEMENTS
    loaded = dequantize_state(stored)
    assert loaded.keys() == state.keys()
    for key in ("w", "conv"):
        rows = state[key].reshape(state[key].shape[0], -1)
        error = (loaded[key] - state[key]).reshape(rows.shape).abs()
        # Half a step, plus float32 rounding of q * s.
        bound = rows.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-4)
        assert (error <= bound).all(), key
        assert loaded[key].dtype == torch.float32 and loaded[key].shape == state[key].shape
    assert (loaded["w"][5] == 0).all()
    # Not lossless: a large-spread row loses detail (so the bound above is what the test can promise).
    assert not torch.equal(loaded["w"], matrix)


def test_dequantize_errors() -> None:
    stored = quantize_state({"w": torch.randn(64, 64)})
    with pytest.raises(ValueError, match="has no per-row scales"):
        dequantize_state({"w": stored["w"]})
    with pytest.raises(ValueError, match="has no int8 matrix"):
        dequantize_state({"w" + SCALE_SUFFIX: stored["w" + SCALE_SUFFIX]})
    with pytest.raises(ValueError, match="the scales' suffix"):
        quantize_state({"w" + SCALE_SUFFIX: torch.randn(64, 64)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Blip3o, Path, Path]:
    """One untrained tiny model saved with float16 storage, with and without an int8 DiT."""
    root = tmp_path_factory.mktemp("int8")
    model = save_untrained_tiny_model(root / "fp32")
    model.save_pretrained(root / "fp16", dtype=torch.float16)
    model.save_pretrained(root / "int8", dtype=torch.float16, dit_int8=True)
    return model, root / "fp16", root / "int8"


def test_int8_dit_folder_is_smaller_and_loads_in_float32(saved: tuple[Blip3o, Path, Path]) -> None:
    model, fp16_dir, int8_dir = saved
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["dit_storage"] == "int8" and config["storage_dtype"] == "float16"
    assert "dit_storage" not in json.loads((fp16_dir / "config.json").read_text())
    stored = load_file(int8_dir / "dit" / "model.safetensors")
    assert any(t.dtype == torch.int8 for t in stored.values())
    ratio = (int8_dir / "dit" / "model.safetensors").stat().st_size / (
        fp16_dir / "dit" / "model.safetensors"
    ).stat().st_size
    assert ratio < 0.7, ratio  # int8 matrices: about half of float16 (small tensors and scales aside)

    loaded = Blip3o.from_pretrained(int8_dir)
    half = Blip3o.from_pretrained(fp16_dir)
    original = model.dit.state_dict()
    for key, value in loaded.dit.state_dict().items():
        assert value.dtype == torch.float32, key
        if stored[key].dtype == torch.int8:
            rows = original[key].reshape(original[key].shape[0], -1)  # (out, rest)
            bound = rows.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-4)
            assert ((value - original[key]).reshape(rows.shape).abs() <= bound).all(), key
        else:  # as float16 storage left it
            assert torch.equal(value, half.dit.state_dict()[key]), key
    # Only the DiT is stored differently.
    for part in ("backbone", "clip", "decoder"):
        a, b = getattr(loaded, part).state_dict(), getattr(half, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    target = loaded.generate_target(["a red circle"], steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(target).all()


def test_int8_dit_load_errors(saved: tuple[Blip3o, Path, Path], tmp_path: Path) -> None:
    _, _, int8_dir = saved
    config = json.loads((int8_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "dit_storage": "int4"}))
    with pytest.raises(ModelLoadError, match="unknown dit_storage 'int4'"):
        Blip3o.from_pretrained(bad)

    broken = tmp_path / "broken"
    shutil.copytree(int8_dir, broken)
    weights = broken / "dit" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX)}, weights)
    with pytest.raises(ModelLoadError, match=r"cannot load the dit .* has no per-row scales"):
        Blip3o.from_pretrained(broken)
