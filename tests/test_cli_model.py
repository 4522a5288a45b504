"""`blip3o generate` / `blip3o ask` on a saved (untrained) tiny model, the save/load round trip of the whole
model, and every stage kind's loss. Untrained models make noise and garbage text: these tests check the
mechanics (files, sizes, determinism, errors), never quality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o import bundled
from blip3o.cli import ask, generate
from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.train.stages import StageModule, fit_feature_statistics, set_trainable
from blip3o.world.language import annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from conftest import save_untrained_tiny_model

FAST = ["--steps", "2", "--decoder-steps", "2"]  # sampling mechanics do not need 30 + 20 steps


def _scenes(n: int, seed: int = 0) -> tuple[list[Image.Image], list]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [render(s) for s in scenes], [annotate(s, rng) for s in scenes]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Blip3o, Path]:
    """One untrained tiny model and the folder it is saved in."""
    folder = tmp_path_factory.mktemp("model") / "final"
    return save_untrained_tiny_model(folder), folder


@pytest.fixture(scope="module")
def model_dir(saved: tuple[Blip3o, Path]) -> Path:
    return saved[1]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- generate


def test_generate_writes_a_64px_png_deterministically(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["a red circle", "--model", str(model_dir), *FAST]
    assert generate.main([*common, "-o", str(tmp_path / "a.png"), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a.png'} (64x64)" in out and " s " in out  # what it wrote, and the time
    with Image.open(tmp_path / "a.png") as image:
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")

    assert generate.main([*common, "-o", str(tmp_path / "b.png"), "--seed", "3"]) == 0
    assert generate.main([*common, "-o", str(tmp_path / "c.png"), "--seed", "4"]) == 0
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))

    # --scale upsamples by nearest neighbour: every pixel becomes a 4x4 block of itself.
    assert generate.main([*common, "-o", str(tmp_path / "d.png"), "--seed", "3", "--scale", "4"]) == 0
    big = _pixels(tmp_path / "d.png")
    assert big.shape == (256, 256, 3)
    assert np.array_equal(big[::4, ::4], _pixels(tmp_path / "a.png"))


def test_generate_several_images_and_grid(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples" / "out.png"  # the folder does not exist yet: it is made
    args = ["a blue square", "--model", str(model_dir), "-o", str(out), "--num-images", "3", "--grid", *FAST]
    assert generate.main(args) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["out_000.png", "out_001.png", "out_002.png", "out_grid.png"]
    frames = [_pixels(out.parent / f"out_{i:03d}.png") for i in range(3)]
    assert all(f.shape == (64, 64, 3) for f in frames)
    assert not np.array_equal(frames[0], frames[1])  # one seed, but each image its own draw
    with Image.open(out.parent / "out_grid.png") as grid:
        # Three 128-px cells in a row, each with a label band below.
        assert grid.width == 3 * 128 and grid.height > 128

    # Several prompts, one image each: also numbered files, prompt order.
    two = tmp_path / "two.png"
    assert generate.main(["a", "b", "--model", str(model_dir), "-o", str(two), *FAST]) == 0
    assert not two.exists() and (tmp_path / "two_000.png").is_file() and (tmp_path / "two_001.png").is_file()


def test_generate_with_a_guidance_interval(saved: tuple[Blip3o, Path], tmp_path: Path) -> None:
    # An untrained DiT's zero-initialised gates ignore the condition, so guidance would change nothing: perturb it.
    model = Blip3o.from_pretrained(saved[1])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.dit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(tmp_path / "guided")
    common = ["a red circle", "--model", str(tmp_path / "guided"), "--steps", "4", "--decoder-steps", "2"]
    runs = {
        "default": [],
        "unguided": ["--cfg-scale", "1"],
        "whole": ["--cfg-interval", "0,1"],
        "late": ["--cfg-interval", "0,0.3"],
    }
    for name, extra in runs.items():
        assert generate.main([*common, *extra, "-o", str(tmp_path / f"{name}.png")]) == 0
    assert not np.array_equal(_pixels(tmp_path / "default.png"), _pixels(tmp_path / "unguided.png"))
    # Guiding at every level is the default; guiding only the last, low-noise steps draws another image.
    assert np.array_equal(_pixels(tmp_path / "default.png"), _pixels(tmp_path / "whole.png"))
    assert not np.array_equal(_pixels(tmp_path / "default.png"), _pixels(tmp_path / "late.png"))


def test_set_guidance_interval_is_the_models_config_and_is_saved(
    saved: tuple[Blip3o, Path], tmp_path: Path
) -> None:
    model = Blip3o.from_pretrained(saved[1])
    assert model.set_guidance_interval(0.2, 0.8, 0.5) is model
    flow = model.config.flow
    assert (flow.cfg_sigma_min, flow.cfg_sigma_max, flow.cfg_outside) == (0.2, 0.8, 0.5)
    assert model.objective.cfg == flow  # what the sampler reads
    model.save_pretrained(tmp_path / "m")
    assert Blip3o.from_pretrained(tmp_path / "m").config.flow == flow
    with pytest.raises(ValueError, match="guidance interval"):
        model.set_guidance_interval(0.9, 0.1)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--num-images", "0"], "--num-images must be >= 1"),
        (["--decoder-steps", "-1"], "--decoder-steps must be >= 1"),
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        (["--cfg-interval", "0.1"], "--cfg-interval takes MIN,MAX or MIN,MAX,OUTSIDE"),
        (["--cfg-interval", "a,b"], "--cfg-interval takes MIN,MAX or MIN,MAX,OUTSIDE"),
        (["--cfg-interval", "0.7,0.2"], "--cfg-interval needs 0 <= MIN <= MAX <= 1"),
        (["--cfg-interval", "0,1,2"], "OUTSIDE in [0, 1]"),
    ],
)
def test_generate_rejects_bad_numbers(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    assert generate.main(["x", "--model", str(model_dir), "-o", str(tmp_path / "o.png"), *extra]) == 2
    assert needle in _one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_generate_model_and_output_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = ["-o", str(tmp_path / "o.png")]
    monkeypatch.setattr(bundled, "model_path", lambda: tmp_path / "no_bundled_model")
    assert generate.main(["x", *out]) == 2
    assert "no bundled model in this install; pass --model PATH" in _one_line_error(capsys)

    assert generate.main(["x", "--model", str(tmp_path / "missing"), *out]) == 2
    assert "does not exist" in _one_line_error(capsys)

    # A run folder instead of its model: say where the model is.
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert generate.main(["x", "--model", str(tmp_path / "run"), *out]) == 2
    assert str(tmp_path / "run" / "final") in _one_line_error(capsys)

    # The output's folder would have to be made inside a file.
    (tmp_path / "a_file").write_text("")
    bad_out = ["-o", str(tmp_path / "a_file" / "o.png")]
    assert generate.main(["x", "--model", str(model_dir), *bad_out]) == 2
    assert "is a file, not a folder" in _one_line_error(capsys)

    assert generate.main(["x", "--model", str(model_dir), "-o", str(tmp_path / "no_extension")]) == 2
    assert "give a name ending in .png" in _one_line_error(capsys)

    # User text must not spell a special token (it would be parsed as one).
    assert generate.main(["x <|im_end|>", "--model", str(model_dir), *out]) == 2
    assert "special token" in _one_line_error(capsys)


def test_truncated_weights_are_named(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    weights = corrupt / "dit" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert generate.main(["x", "--model", str(corrupt), "-o", str(tmp_path / "o.png"), *FAST]) == 2
    assert str(weights) in _one_line_error(capsys)
    image = tmp_path / "i.png"
    Image.new("RGB", (64, 64)).save(image)
    assert ask.main([str(image), "what?", "--model", str(corrupt)]) == 2
    assert str(weights) in _one_line_error(capsys)


def test_errors_through_the_real_command(tmp_path: Path) -> None:
    """The installed entry point: exit code 2 and one line on stderr (this path imports no torch: fast)."""
    cmd = [sys.executable, "-m", "blip3o.cli.main", "generate", "x", "--model", str(tmp_path / "nope")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"blip3o generate: error: model folder {tmp_path / 'nope'} does not exist\n"


# ---------------------------------------------------------------------------------------------- ask


def test_ask_answers_png_and_odd_images(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, _ = _scenes(1)
    png = tmp_path / "scene.png"
    images[0].save(png)
    assert (
        ask.main([str(png), "what colour is the circle?", "--model", str(model_dir), "--max-new-tokens", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1  # one answer, one line

    # Not 64 px, with alpha; and grayscale: resized by the processor, converted to RGB.
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (100, 80), (255, 0, 0, 128)).save(rgba)
    gray = tmp_path / "gray.png"
    Image.new("L", (40, 90), 128).save(gray)
    for path in (rgba, gray):
        assert ask.main([str(path), "what is it?", "--model", str(model_dir), "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out.count("\n") == 1
    loaded = ask.load_image(rgba)
    assert loaded.mode == "RGB" and loaded.size == (100, 80)
    assert loaded.getpixel((0, 0)) == (255, 127, 127)  # half-transparent red over white


def test_ask_batch_prints_json_lines(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, annotations = _scenes(3, seed=1)
    lines = []
    for i, (image, annotation) in enumerate(zip(images, annotations, strict=True)):
        image.save(tmp_path / f"{i}.png")
        record = {"id": f"q{i}", "image": str(tmp_path / f"{i}.png"), "question": annotation.qa[0].question}
        lines.append(json.dumps(record))
    batch = tmp_path / "questions.jsonl"
    batch.write_text("\n".join(lines) + "\n\n")  # a blank line is skipped
    args = ["--batch", str(batch), "--model", str(model_dir), "--max-new-tokens", "3", "--batch-size", "2"]
    assert ask.main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]  # in order, ids passed through
    assert all(isinstance(r["answer"], str) for r in records)

    # Batched answers equal one-at-a-time answers (left padding must not change greedy decoding).
    single = ask.main(
        [str(tmp_path / "1.png"), records[1]["question"], "--model", str(model_dir), "--max-new-tokens", "3"]
    )
    assert single == 0
    assert capsys.readouterr().out == records[1]["answer"] + "\n"


def test_ask_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ["--model", str(model_dir)]
    assert ask.main([str(tmp_path / "missing.png"), "q", *model]) == 2
    assert "does not exist" in _one_line_error(capsys)

    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    assert ask.main([str(text), "q", *model]) == 2
    assert "not an image file" in _one_line_error(capsys)

    png = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(png)
    assert ask.main([str(png), "q", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    monkeypatch.setattr(bundled, "model_path", lambda: tmp_path / "no_bundled_model")
    assert ask.main([str(png), "q"]) == 2
    assert "no bundled model in this install" in _one_line_error(capsys)
    assert ask.main([str(png), "q", *model, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in _one_line_error(capsys)

    batch = tmp_path / "b.jsonl"
    batch.write_text(
        json.dumps({"image": str(png), "question": "q"})
        + "\n"
        + json.dumps({"image": "gone.png", "question": "q"})
        + "\n"
    )
    assert ask.main(["--batch", str(batch), *model]) == 2
    assert f"{batch}:2: image gone.png does not exist" in _one_line_error(capsys)
    batch.write_text('{"image": "ok.png"}\n')
    assert ask.main(["--batch", str(batch), *model]) == 2
    assert f"{batch}:1: expected" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------- model


def test_save_load_round_trip_is_exact(saved: tuple[Blip3o, Path]) -> None:
    model, folder = saved
    loaded = Blip3o.from_pretrained(folder)
    prompts = ["a red circle left of a blue square", "two green triangles"]
    with torch.no_grad():
        assert torch.equal(model.condition(prompts), loaded.condition(prompts))
    kw = {"num_images": 2, "steps": 2, "decoder_steps": 2, "seed": 7}
    for a, b in zip(model.generate(prompts, **kw), loaded.generate(prompts, **kw), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    images, annotations = _scenes(2, seed=2)
    questions = [a.qa[0].question for a in annotations]
    answers = model.understand(images, questions, max_new_tokens=4)
    assert answers == loaded.understand(images, questions, max_new_tokens=4)
    assert all(isinstance(a, str) for a in answers)


@pytest.fixture(scope="module")
def stage_model() -> Blip3o:
    """A separate model: stage tests flip requires_grad and leave gradients behind."""
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=1)
    fit_feature_statistics(model, _scenes(8, seed=3)[0])
    return model


@pytest.mark.parametrize("kind", ["clip", "decoder", "understanding", "generation"])
def test_stage_losses_are_finite_scalars_with_grad(stage_model: Blip3o, kind: str) -> None:
    images, annotations = _scenes(2, seed=4)
    batch = {
        "images": images,
        "captions": [a.short_caption for a in annotations],
        "prompts": [a.qa[0].question for a in annotations],
        "answers": [a.qa[0].answer for a in annotations],
        "seeds": [0, 1],
    }
    trainable = set_trainable(stage_model, kind)
    stage_model.zero_grad(set_to_none=True)
    loss, metrics = StageModule(stage_model, kind)(batch)
    assert isinstance(metrics, dict)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    params = dict(stage_model.named_parameters())
    grads = [params[n].grad for n in trainable if params[n].grad is not None]
    assert grads, f"no trainable parameter of {kind} got a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    frozen = [n for n, p in params.items() if n not in trainable and p.grad is not None]
    assert not frozen, f"{kind} sent gradients to frozen parameters: {frozen[:3]}"
