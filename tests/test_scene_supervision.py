"""The "vision" stage: scene-cell labels, the linear scene head, and what the stage trains."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blip3o.data.shards import write_shards
from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.train.config import ConfigError, DataConfig, StageConfig
from blip3o.train.data import load_shards
from blip3o.train.loop import train_stage
from blip3o.train.optim import build_optimizer
from blip3o.train.parallelize import init_distributed
from blip3o.train.presets import preset
from blip3o.train.scene_supervision import (
    NO_OBJECT_COLOR,
    NO_OBJECT_SHAPE,
    PATCH_LABEL_GROUPS,
    PATCH_LABEL_VALUES,
    SceneCellHead,
    SceneEmbeddingTable,
    cell_centres,
    clip_patch_labels,
    object_label_detections,
    object_label_scene,
    scene_cell_labels,
    scene_object_labels,
    scene_patch_labels,
)
from blip3o.train.stages import StageModule, parameters_of, set_trainable
from blip3o.world.judge import detect
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, MAX_BOX, MAX_ROTATION, SHAPES, Scene, SceneObject


def _object(shape: str, color: str, cx: float, cy: float, half: float) -> SceneObject:
    return SceneObject(
        shape, color, (0, 0, 0), (cx, cy), 0.0, 1.0, (cx - half, cy - half, cx + half, cy + half)
    )


def _fit_fixed_batch(module: StageModule, named: list, batch: dict, steps: int) -> list[float]:
    """AdamW at lr 3e-3 on one batch; the loss of every step."""
    optimizer = build_optimizer(named, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = module(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_cell_labels_follow_object_centres_in_raster_order() -> None:
    scene = Scene(
        background=(128, 128, 128),
        objects=(
            _object("star", "red", 56.0, 8.0, 8.0),  # top-right cell of 4 x 4 (16 px cells): index 3
            _object("circle", "blue", 20.0, 40.0, 6.0),  # row 2, column 1: index 9
            _object("square", "green", 22.0, 44.0, 10.0),  # same cell, larger box: wins
        ),
    )
    shape, colour = scene_cell_labels(scene, grid=4)
    assert shape.shape == colour.shape == (16,)
    assert shape[3] == SHAPES.index("star") and colour[3] == COLOR_NAMES.index("red")
    assert shape[9] == SHAPES.index("square") and colour[9] == COLOR_NAMES.index("green")
    others = [i for i in range(16) if i not in (3, 9)]
    assert (shape[others] == NO_OBJECT_SHAPE).all() and (colour[others] == NO_OBJECT_COLOR).all()


def test_scene_head_loss_and_bad_input() -> None:
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(3)]
    head = SceneCellHead(hidden_size=8)
    loss, metrics = head.loss(torch.randn(3, 16, 8), scenes)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 0.0 <= metrics["shape_acc"] <= 1.0 and 0.0 <= metrics["colour_acc"] <= 1.0
    with pytest.raises(ValueError, match="square grid"):
        head.loss(torch.randn(3, 15, 8), scenes)
    with pytest.raises(ValueError, match="one scene per image"):
        head.loss(torch.randn(3, 16, 8), [scenes[0], None, scenes[2]])


def test_cosine_scene_head_reads_the_token_direction_only() -> None:
    """A cosine head's logits lie within +-scale and ignore the token's norm; a linear one's grow with it."""
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(3)]
    cosine, linear = SceneCellHead(8, cosine_scale=5.0), SceneCellHead(8)
    assert cosine.shape.bias is None and cosine.colour.bias is None  # nothing unused for DDP to refuse
    linear.load_state_dict(
        cosine.state_dict(), strict=False
    )  # same class vectors, the linear head's own bias
    tokens = torch.randn(3, 16, 8)
    flat = tokens.reshape(-1, 8)
    logits = cosine.logits(cosine.shape, flat)  # (48, classes)
    assert logits.abs().max() <= 5.0 + 1e-5
    torch.testing.assert_close(cosine.logits(cosine.shape, 10 * flat), logits)
    torch.testing.assert_close(cosine.loss(10 * tokens, scenes)[0], cosine.loss(tokens, scenes)[0])
    assert not torch.allclose(linear.loss(10 * tokens, scenes)[0], linear.loss(tokens, scenes)[0])
    with pytest.raises(ValueError, match="cosine_scale"):
        SceneCellHead(8, cosine_scale=-1.0)
    with pytest.raises(ConfigError, match="scene_cosine_scale"):
        StageConfig("und", "understanding", steps=1, batch_size=1, scene_cosine_scale=10.0)
    assert StageConfig("vision", "vision", steps=1, batch_size=1, scene_cosine_scale=10.0).scene_cosine_scale


def test_cell_centres_follow_the_label_raster() -> None:
    centres = cell_centres(4)
    assert centres.shape == (16, 2)
    # The top-right cell (index 3 in scene_cell_labels' raster); y grows downward.
    assert centres[3].tolist() == [0.75, -0.75]
    assert centres[9].tolist() == [-0.25, 0.25]  # row 2, column 1


def test_position_head_is_optional_and_scores_its_cells() -> None:
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(3)]
    assert SceneCellHead(16).position is None  # off by default: no extra weights in older checkpoints
    head = SceneCellHead(16, position_weight=2.0)
    plain = SceneCellHead(16)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("position.")})
    tokens = torch.eye(16).expand(3, 16, 16)  # (B, N, H): token i is one-hot in channel i
    with torch.no_grad():  # a regressor that reads each token's cell exactly
        head.position.weight.copy_(cell_centres(4).T)
        head.position.bias.zero_()
    exact, metrics = head.loss(tokens, scenes)
    classification_only, _ = plain.loss(tokens, scenes)
    assert metrics["position_acc"] == 1.0 and torch.allclose(exact, classification_only)
    with torch.no_grad():
        head.position.bias.fill_(0.5)  # every prediction moves one cell right and down
    shifted, metrics = head.loss(tokens, scenes)
    assert torch.allclose(shifted, classification_only + 2.0 * 0.25)
    assert metrics["position_acc"] == pytest.approx(1 / 16)  # only the bottom-right cell clamps back
    with pytest.raises(ValueError, match="position_weight"):
        SceneCellHead(16, position_weight=-1.0)


def test_scene_embedding_target_sums_the_cell_and_its_objects() -> None:
    """Each cell's target: its row + column vectors, plus shape + colour + third-row + third-column vectors of the
    object whose box centre lies in it, or the empty vector; fixed by the seed."""
    scene = Scene(
        background=(128, 128, 128),
        objects=(
            _object("star", "red", 56.0, 8.0, 7.0),  # cell (0, 3); thirds: top, right
            _object(
                "circle", "blue", 20.0, 40.0, 6.0
            ),  # cell (2, 1); thirds: middle (40 < 42.7), left (20 < 21.3)
        ),
    )
    table = SceneEmbeddingTable(hidden_size=12)
    cell_row, cell_col, shape, colour, third_row, third_col, empty = table.parts()
    target = table.targets([scene, scene], grid=4)  # (2, 16, 12)
    assert target.shape == (2, 16, 12) and torch.equal(target[0], target[1])
    star = shape[SHAPES.index("star")] + colour[COLOR_NAMES.index("red")] + third_row[0] + third_col[2]
    circle = shape[SHAPES.index("circle")] + colour[COLOR_NAMES.index("blue")] + third_row[1] + third_col[0]
    torch.testing.assert_close(target[0, 3], cell_row[0] + cell_col[3] + star)
    torch.testing.assert_close(target[0, 9], cell_row[2] + cell_col[1] + circle)
    torch.testing.assert_close(target[0, 14], cell_row[3] + cell_col[2] + empty[0])
    # Fixed: the same seed gives the same vectors; a buffer, so it is saved with the head and never trained.
    assert torch.equal(SceneEmbeddingTable(12).table, table.table)
    assert "table" in dict(table.named_buffers()) and not list(table.parameters())
    with pytest.raises(ValueError, match="4x4 grid"):
        table.targets([scene], grid=2)


def test_scene_embedding_loss_is_zero_on_its_target_and_optional() -> None:
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(3)]
    assert SceneCellHead(16).embeddings is None  # off by default: older checkpoints load
    head = SceneCellHead(16, embedding_weight=0.5)
    plain = SceneCellHead(16)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("embeddings.")})
    target = head.embeddings.targets(scenes, 4)  # (3, 16, 16)
    exact, metrics = head.loss(target, scenes)
    assert metrics["embedding_error"] == 0.0
    torch.testing.assert_close(exact, plain.loss(target, scenes)[0])
    zeros, metrics = head.loss(torch.zeros_like(target), scenes)
    assert metrics["embedding_error"] == pytest.approx(1.0)
    torch.testing.assert_close(
        zeros, plain.loss(torch.zeros_like(target), scenes)[0] + 0.5 * target.pow(2).mean()
    )
    with pytest.raises(ValueError, match="embedding_weight"):
        SceneCellHead(16, embedding_weight=-1.0)
    with pytest.raises(ConfigError, match="scene_embedding_weight"):
        StageConfig("und", "understanding", steps=1, batch_size=1, scene_embedding_weight=1.0)
    with pytest.raises(ConfigError, match="scene_embedding_weight"):
        StageConfig("vision", "vision", steps=1, batch_size=1, scene_embedding_weight=-1.0)


def test_vision_stage_trains_only_the_vision_tower_and_learns_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(8)]
    batch = {"images": [render(s) for s in scenes], "scenes": scenes}
    trainable = set_trainable(model, "vision")
    assert trainable and all(n.startswith("backbone.vlm.model.visual.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = StageModule(model, "vision")
    # The optimiser takes the module's parameters: the model's trainable ones plus the stage's scene head.
    named = list(parameters_of(module))
    assert any(n.startswith("scene_head.") for n, _ in named)
    losses = _fit_fixed_batch(module, named, batch, steps=40)
    print(f"vision stage, fixed batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] / 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("backbone.vlm.model.visual.") for n in changed)
    # The head is scaffolding: nothing of it is in the model's weights.
    assert not any("scene_head" in n for n in model.state_dict())


def test_vision_stage_with_scene_embedding_regresses_the_merged_tokens() -> None:
    """The stage hands the merged tokens the language model reads to the target: its error is reported, and with
    the tokens set to the target the stage's loss is the classifiers' alone."""
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(2)]
    batch = {"images": [render(s) for s in scenes], "scenes": scenes}
    module = StageModule(model, "vision", scene_embedding_weight=1.0)
    loss, metrics = module(batch)
    assert metrics["embedding_error"] > 0.0 and torch.isfinite(loss)
    tokens = model.backbone.vision_tokens(batch["images"])  # (B, N, H)
    target = module.scene_head.embeddings.targets(scenes, 4)
    expected = module.scene_head.loss(tokens, scenes)[0]
    torch.testing.assert_close(loss, expected)
    assert expected > module.scene_head.loss(target, scenes)[0]


def test_freeze_vision_keeps_the_tower_out_of_stage_one() -> None:
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)
    frozen = set_trainable(model, "understanding", freeze_vision=True)
    full = set_trainable(model, "understanding")
    assert not any(n.startswith("backbone.vlm.model.visual.") for n in frozen)
    assert any(n.startswith("backbone.vlm.model.language_model.") for n in frozen)
    assert set(frozen) < set(full) and any(n.startswith("backbone.vlm.model.visual.") for n in full)
    with pytest.raises(ConfigError, match="freeze_vision"):
        StageConfig("gen", "generation", steps=1, batch_size=1, freeze_vision=True)
    assert StageConfig("und", "understanding", steps=1, batch_size=1, freeze_vision=True).freeze_vision
    with pytest.raises(ConfigError, match="cell_position_weight"):
        StageConfig("und", "understanding", steps=1, batch_size=1, cell_position_weight=1.0)
    with pytest.raises(ConfigError, match="cell_position_weight"):
        StageConfig("vision", "vision", steps=1, batch_size=1, cell_position_weight=-0.5)


def test_vision_stage_checkpoints_its_head_and_resumes(tmp_path: Path) -> None:
    """The head is trained state: a stopped vision stage resumes with it; the export leaves it out."""
    shards = tmp_path / "data"
    write_shards(shards, n=16, seed=0, progress=False)
    examples, _ = load_shards(shards)
    stage = StageConfig(
        "vision",
        "vision",
        steps=10,
        batch_size=4,
        lr=1e-3,
        log_every=1,
        ckpt_every=5,
        cell_position_weight=1.0,
    )
    run = replace(preset("tiny-test"), stages=(stage,), data=DataConfig(shards=str(shards)))
    model = Blip3o.from_config(run.model, seed=0)
    dist = init_distributed("cpu")
    first = train_stage(model, stage, 0, run, tmp_path, examples, dist, None, progress=False, stop_after_s=0)
    assert first.end_step == 1
    record = json.loads((tmp_path / "vision" / "log.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["shape_acc"] <= 1.0 and 0.0 <= record["colour_acc"] <= 1.0  # the head's figures
    assert 0.0 <= record["position_acc"] <= 1.0
    saved = load_file(tmp_path / "vision" / "checkpoints" / "step_00000001" / "model.safetensors")
    assert any(k.startswith("scene_head.position.") for k in saved)
    exported = Blip3o.from_pretrained(first.model_dir)
    assert not any("scene_head" in n for n in exported.state_dict())
    second = train_stage(
        Blip3o.from_config(run.model, seed=0), stage, 0, run, tmp_path, examples, dist, None, progress=False,
        stop_after_s=0,
    )  # fmt: skip
    assert (second.end_step, second.steps_run) == (2, 1)  # resumed, head included (a missing key would raise)


def test_patch_labels_are_coverage_shares_in_raster_order() -> None:
    # One axis-aligned 16 x 16 square covering patches (row 0..1, col 6..7) of the 8 x 8 grid exactly.
    square = SceneObject("square", "red", (0, 0, 0), (56.0, 8.0), 0.0, 8.0, (48.0, 0.0, 64.0, 16.0))
    star = SceneObject("star", "blue", (0, 0, 0), (20.0, 40.0), 0.0, 8.0, (12.0, 32.0, 28.0, 48.0))
    scene = Scene(background=(230, 230, 230), objects=(square, star))
    labels = scene_patch_labels(scene, grid=8)
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    assert labels.shape == (64, n_shapes + n_colours + PATCH_LABEL_VALUES)
    shapes, colours, quads = labels[:, :n_shapes], labels[:, n_shapes : n_shapes + n_colours], labels[:, -4:]
    # Each group is a distribution over its classes, "none" last.
    assert torch.allclose(shapes.sum(1), torch.ones(64)) and torch.allclose(colours.sum(1), torch.ones(64))
    # The square's four patches are fully covered by a red square; so are all their quadrants.
    for index in (6, 7, 14, 15):
        assert shapes[index, SHAPES.index("square")] == pytest.approx(1.0, abs=0.02)
        assert colours[index, COLOR_NAMES.index("red")] == pytest.approx(1.0, abs=0.02)
        assert torch.allclose(quads[index], torch.ones(4), atol=0.02)
    # The star lies around (20, 40): only patches near it see blue; far ones are "none".
    blue = colours[:, COLOR_NAMES.index("blue")].reshape(8, 8)
    assert blue[4:6, 1:4].sum() > 1.0 and blue[:2].sum() == 0 and blue[:, 5:].sum() == 0
    assert shapes[0, -1] == 1.0 and colours[0, -1] == 1.0 and quads[0].sum() == 0
    # Quadrants are the patch's own coverage, finer: their mean is the covered share.
    assert torch.allclose(quads.mean(1), 1 - shapes[:, -1], atol=1e-5)


def test_patch_labels_quadrant_order_and_batch_check() -> None:
    # A 4 x 4 px square in the top-right quadrant of patch (0, 0): pixels x 4..8, y 0..4.
    corner = SceneObject("square", "green", (0, 0, 0), (6.0, 2.0), 0.0, 2.0, (4.0, 0.0, 8.0, 4.0))
    labels = scene_patch_labels(Scene(background=(230, 230, 230), objects=(corner,)), grid=8)
    assert torch.allclose(labels[0, -4:], torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=0.1)  # TL, TR, BL, BR
    config = replace(
        tiny_config().clip,
        patch_label_weight=1.0,
        patch_label_groups=PATCH_LABEL_GROUPS,
        patch_label_values=PATCH_LABEL_VALUES,
    )
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(2)]
    assert clip_patch_labels(config, scenes).shape == (2, 64, 19)
    with pytest.raises(ValueError, match="one scene per image"):
        clip_patch_labels(config, None)
    with pytest.raises(ValueError, match="do not match"):
        clip_patch_labels(replace(config, patch_label_groups=(6, 8)), scenes)


def test_object_labels_name_each_object_at_its_box_centre_patch() -> None:
    # A 16 x 16 square centred at (56, 8): box centre in patch (row 1, col 7) (8 // 8 = 1, 56 // 8 = 7).
    square = SceneObject("square", "red", (0, 0, 0), (56.0, 8.0), 10.0, 8.0, (48.0, 0.0, 64.0, 16.0))
    # A 12 x 20 star box centred at (21, 37): patch (4, 2), offset (+0.25, +0.25) half patches, mean side 16.
    star = SceneObject("star", "blue", (0, 0, 0), (21.0, 37.0), -20.0, 8.0, (15.0, 27.0, 27.0, 47.0))
    labels = scene_object_labels(Scene(background=(230, 230, 230), objects=(square, star)), grid=8)
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    assert labels.shape == (64, n_shapes + n_colours + PATCH_LABEL_VALUES)
    named = (labels[:, n_shapes - 1] == 0).nonzero().flatten().tolist()
    assert named == [1 * 8 + 7, 4 * 8 + 2]  # raster order
    square_label, star_label = labels[15], labels[34]
    assert (
        square_label[SHAPES.index("square")] == 1 and square_label[n_shapes + COLOR_NAMES.index("red")] == 1
    )
    assert star_label[SHAPES.index("star")] == 1 and star_label[n_shapes + COLOR_NAMES.index("blue")] == 1
    # square: offset (0, -1): centre (56, 8) vs patch centre (60, 12); side 16 -> -0.2; rotation 10 / 20.
    assert torch.allclose(square_label[-4:], torch.tensor([-1.0, -1.0, -0.2, 0.5]))
    assert torch.allclose(star_label[-4:], torch.tensor([0.25, 0.25, -0.2, -1.0]))
    # Every other patch says "none" in both groups and has zero values; each group sums to one.
    assert torch.equal(
        labels[0],
        torch.eye(n_shapes + n_colours + 4)[n_shapes - 1]
        + torch.eye(n_shapes + n_colours + 4)[n_shapes + n_colours - 1],
    )
    assert torch.allclose(labels[:, :n_shapes].sum(1), torch.ones(64))
    assert torch.allclose(labels[:, n_shapes : n_shapes + n_colours].sum(1), torch.ones(64))
    # On sampled scenes: one named patch per object (no two centres share an 8 px patch).
    for seed in range(50):
        scene = sample_scene(np.random.default_rng(seed))
        assert int((scene_object_labels(scene, 8)[:, n_shapes - 1] == 0).sum()) == len(scene.objects)
    # Read back as judge detections: each object's shape, colour and box centre; the box is a square of its mean side.
    found = object_label_detections(labels)
    assert [(d.shape, d.color, d.confidence) for d in found] == [
        ("square", "red", 1.0),
        ("star", "blue", 1.0),
    ]
    assert found[0].box == pytest.approx((48.0, 0.0, 64.0, 16.0), abs=1e-5)
    assert found[1].box == pytest.approx((13.0, 29.0, 29.0, 45.0), abs=1e-5)  # centre (21, 37), side 16
    # A weaker "object" reading next to a centre is not a second object; a stronger one elsewhere is.
    blurred = labels.clone()
    weak_square = 0.6 * torch.eye(n_shapes)[SHAPES.index("square")] + 0.4 * torch.eye(n_shapes)[-1]
    blurred[23, :n_shapes] = weak_square  # below the square's patch 15 (row 1, col 7)
    blurred[0, :n_shapes] = weak_square  # far from both
    assert [d.shape for d in object_label_detections(blurred)] == ["square", "square", "star"]
    assert [d.confidence for d in object_label_detections(blurred)] == pytest.approx([0.6, 1.0, 1.0])
    # Two true centres in neighbouring patches tie and both stay.
    close = labels.clone()
    close[14] = labels[15]
    assert len(object_label_detections(close)) == 3
    with pytest.raises(ValueError, match="labels"):
        object_label_detections(labels[:, :18])
    with pytest.raises(ValueError, match="two object centres"):
        scene_object_labels(Scene(background=(230, 230, 230), objects=(square, star)), grid=1)
    # A CLIP config picks the label kind.
    config = replace(
        tiny_config().clip,
        patch_label_weight=1.0,
        patch_label_groups=PATCH_LABEL_GROUPS,
        patch_label_values=PATCH_LABEL_VALUES,
        patch_label_kind="object",
    )
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(2)]
    assert torch.equal(clip_patch_labels(config, scenes)[1], scene_object_labels(scenes[1], 8))
    with pytest.raises(ValueError, match="patch_label_kind"):
        replace(config, patch_label_kind="pixels")


def test_clip_stage_trains_the_label_head_from_scenes() -> None:
    clip = replace(
        tiny_config().clip,
        patch_label_weight=1.0,
        patch_label_groups=PATCH_LABEL_GROUPS,
        patch_label_values=PATCH_LABEL_VALUES,
    )
    model = Blip3o.from_config(tiny_config(clip=clip, tokenizer_corpus_scenes=200), seed=0)
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(8)]
    batch = {"images": [render(s) for s in scenes], "scenes": scenes, "captions": ["a shape"] * 8}
    set_trainable(model, "clip")
    module = StageModule(model, "clip")
    named = list(parameters_of(module))
    assert any(n.startswith("model.clip.label_head.") for n, _ in named)
    losses = _fit_fixed_batch(module, named, batch, steps=30)
    # Identical captions: the contrastive part is constant, the label part is what falls.
    print(f"clip stage with patch labels, fixed batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 1.0
    with pytest.raises(ValueError, match="one scene per image"):
        module({k: v for k, v in batch.items() if k != "scenes"})


def test_object_label_scene_rebuilds_the_labelled_objects_and_draws_them_recognisably() -> None:
    rng = np.random.default_rng(3)
    judged = 0
    for _ in range(40):
        scene = sample_scene(rng)
        rebuilt = object_label_scene(scene_object_labels(scene, 8), np.random.default_rng(0))
        key = lambda o: (o.shape, o.color, tuple(round(v, 3) for v in o.box))  # noqa: E731
        # Same shapes, colours and boxes (the labels keep the box centre, mean side and rotation exactly).
        assert sorted(map(key, rebuilt.objects)) == sorted(map(key, scene.objects))
        found = sorted((d.shape, d.color) for d in detect(render(rebuilt)))
        judged += found == sorted((o.shape, o.color) for o in scene.objects)
    assert judged >= 38  # the pixel judge reads the rebuilt renders as it reads real ones


def test_object_label_scene_clamps_reads_into_shapesworld_ranges() -> None:
    labels = torch.zeros(64, 19)
    labels[:, PATCH_LABEL_GROUPS[0] - 1] = 1.0  # every patch "none"...
    labels[:, sum(PATCH_LABEL_GROUPS) - 1] = 1.0
    labels[0, :6] = torch.eye(6)[SHAPES.index("star")]  # ...but the top-left one: a star of a red colour,
    labels[0, 6 : 6 + 9] = torch.eye(9)[COLOR_NAMES.index("red")]
    labels[0, 15:] = torch.tensor([-1.0, -1.0, 3.0, 2.0])  # at the corner, far too big, over-rotated
    scene = object_label_scene(labels, np.random.default_rng(0))
    (star,) = scene.objects
    assert (star.shape, star.color, star.rotation) == ("star", "red", MAX_ROTATION)
    x0, y0, x1, y1 = star.box
    assert min(x0, y0) >= 0.0 and max(x1, y1) <= scene.size
    assert (x1 - x0 + y1 - y0) / 2 == pytest.approx(MAX_BOX, abs=1e-3)
    assert object_label_scene(torch.cat([labels[1:], labels[1:2]]), np.random.default_rng(0)).objects == ()


def test_freeze_language_trains_only_the_tower_and_leaves_the_condition_bit_identical() -> None:
    """An understanding stage with `freeze_language` tunes what the backbone sees, never what generation reads."""
    torch.manual_seed(0)
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)
    trainable = set_trainable(model, "understanding", freeze_language=True)
    assert trainable and all(n.startswith("backbone.vlm.model.visual.") for n in trainable)
    assert any(".merger." in n for n in trainable)  # the patch merger learns with the tower
    prompts = ["a photo of a red circle", "two blue stars", "a green square left of a yellow triangle"]
    with torch.no_grad():
        condition_before = model.condition(prompts)  # (3, n_queries, H)
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(4)]
    batch = {
        "images": [render(s) for s in scenes],
        "prompts": ["How many objects are there?"] * 4,
        "answers": [str(len(s.objects)) for s in scenes],
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = StageModule(model, "understanding")
    losses = _fit_fixed_batch(module, list(parameters_of(module)), batch, steps=15)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("backbone.vlm.model.visual.") for n in changed)
    with torch.no_grad():
        assert torch.equal(model.condition(prompts), condition_before)
    with pytest.raises(ConfigError, match="freeze_language"):
        StageConfig("gen", "instruct", steps=1, batch_size=1, freeze_language=True)
    with pytest.raises(ConfigError, match="nothing to train"):
        StageConfig("und", "understanding", steps=1, batch_size=1, freeze_language=True, freeze_vision=True)
