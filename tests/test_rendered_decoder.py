"""A decoder stage that conditions on the DiT's own renditions (StageConfig.generated_share)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blip3o.data.shards import write_shards
from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.models.decoder import PixelDecoder
from blip3o.train.config import ConfigError, DataConfig, StageConfig
from blip3o.train.data import load_shards
from blip3o.train.loop import train_stage
from blip3o.train.parallelize import init_distributed
from blip3o.train.presets import preset
from blip3o.train.stages import (
    GENERATED_SIGMA_LEVELS,
    fit_feature_statistics,
    generated_target_draws,
    reading_images,
    rendered_features,
)
from blip3o.transport import initial_noise
from conftest import object_label_model_config

PROMPTS = ["a red circle", "two blue stars", "a green square left of a red cross"]


@pytest.fixture(scope="module")
def model() -> Blip3o:
    return Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0).eval()


def test_generated_share_checks() -> None:
    with pytest.raises(ConfigError, match="decoder stages only"):
        StageConfig("gen", "generation", steps=1, batch_size=1, generated_share=0.5)
    with pytest.raises(ConfigError, match="generated_share must be"):
        StageConfig("dec", "decoder", steps=1, batch_size=1, generated_share=1.5)
    with pytest.raises(ConfigError, match="generated_max_sigma"):
        StageConfig("dec", "decoder", steps=1, batch_size=1, generated_max_sigma=0.0)
    base = preset("tiny-test")
    refine = StageConfig("refine", "decoder", steps=1, batch_size=2, generated_share=0.5)
    with pytest.raises(ConfigError, match="generation stage before it"):
        replace(base, stages=(refine, *base.stages))
    assert replace(base, stages=(*base.stages, refine)).stages[-1] == refine
    with pytest.raises(ConfigError, match="flow-matching DiT"):
        replace(base, model=replace(base.model, objective="mse"), stages=(*base.stages, refine))


def test_generated_pairs_checks() -> None:
    with pytest.raises(ConfigError, match="generated_pairs must be"):
        StageConfig("dec", "decoder", steps=1, batch_size=1, generated_share=0.5, generated_pairs="scene")
    base = preset("tiny-test")
    refine = StageConfig(
        "refine", "decoder", steps=1, batch_size=2, generated_share=0.5, generated_pairs="reading"
    )
    with pytest.raises(ConfigError, match="object label head"):
        replace(base, stages=(*base.stages, refine))
    run = replace(base, model=object_label_model_config(base.model), stages=(*base.stages, refine))
    assert run.stages[-1].generated_pairs == "reading"


def test_reading_images_replace_the_drawn_samples_by_renders_of_their_reading(tmp_path: Path) -> None:
    model = Blip3o.from_config(
        object_label_model_config(tiny_config(tokenizer_corpus_scenes=100)), seed=0
    ).eval()
    write_shards(tmp_path, n=8, seed=0, progress=False)
    images = [e.image for e in load_shards(tmp_path)[0][:4]]
    fit_feature_statistics(model, images)
    features = model.decoder_features(images)  # (4, N, D)
    use = torch.tensor([True, False, True, False])
    drawn = reading_images(model, features, images, [5, 6, 7, 8], use)
    assert drawn[1] is images[1] and drawn[3] is images[3]
    assert all(d.size == i.size for d, i in zip(drawn, images, strict=True))
    assert drawn[0].tobytes() != images[0].tobytes() and drawn[2].tobytes() != images[2].tobytes()
    again = reading_images(model, features, images, [5, 6, 7, 8], use)  # the sample's seed fixes the render
    assert again[0].tobytes() == drawn[0].tobytes()
    other = reading_images(model, features, images, [9, 6, 7, 8], use)
    assert other[0].tobytes() != drawn[0].tobytes() and other[2].tobytes() == drawn[2].tobytes()


def test_draws_are_per_sample_and_follow_the_share() -> None:
    shape = (5, 3, 2, 2)
    draws = generated_target_draws(shape, [1, 2, 3, 4, 5], share=0.5, max_sigma=0.8)
    # A sample's draw depends on its seed only, not on its neighbours in the batch.
    alone = generated_target_draws((1, 3, 2, 2), [3], share=0.5, max_sigma=0.8)
    assert alone.use[0] == draws.use[2] and alone.sigma[0] == draws.sigma[2]
    assert torch.equal(alone.noise[0], draws.noise[2])
    levels = {round(0.8 * k / GENERATED_SIGMA_LEVELS, 6) for k in range(1, GENERATED_SIGMA_LEVELS + 1)}
    assert {round(s, 6) for s in draws.sigma.tolist()} <= levels
    many = list(range(400))
    assert not generated_target_draws((400, 1), many, 0.0, 0.6).use.any()
    assert generated_target_draws((400, 1), many, 1.0, 0.6).use.all()
    share = generated_target_draws((400, 1), many, 0.3, 0.6).use.float().mean().item()
    assert 0.22 < share < 0.38


def test_regenerate_from_full_noise_is_generation_and_from_little_noise_the_target(model: Blip3o) -> None:
    shape = (len(PROMPTS), *model.config.target_shape)
    target = torch.randn(shape)
    noise = initial_noise(shape, torch.Generator().manual_seed(7))
    generated = model.generate_target(PROMPTS, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(model.regenerate_target(target, PROMPTS, 1.0, noise), generated, atol=1e-5)
    kept = model.regenerate_target(target, PROMPTS, 1e-3, noise)
    assert (kept - target).abs().max() < 0.05 * target.abs().max()
    midway = model.regenerate_target(target, PROMPTS, 0.5, noise)
    assert not torch.allclose(midway, target, atol=1e-2) and not torch.allclose(midway, generated, atol=1e-2)


def test_rendered_features_replace_only_the_drawn_samples(tmp_path: Path, model: Blip3o) -> None:
    shards = tmp_path / "data"
    write_shards(shards, n=8, seed=0, progress=False)
    examples, _ = load_shards(shards)
    images, captions = [e.image for e in examples[:4]], [e.short_caption for e in examples[:4]]
    fit_feature_statistics(model, images)
    real = model.decoder_features(images)  # (4, N, D)
    draws = generated_target_draws((4, *model.config.target_shape), [0, 1, 2, 3], 0.5, 0.6)
    draws = draws._replace(use=torch.tensor([True, False, True, False]))
    rendered = rendered_features(model, images, captions, draws, real)  # (4, N, D)
    assert torch.equal(rendered[1::2], real[1::2])
    assert (rendered[0::2] - real[0::2]).abs().mean() > 1e-3
    # each drawn row is its own image's rendition, whatever else the batch holds
    alone = rendered_features(model, images[2:3], captions[2:3], draws._replace(
        use=draws.use[2:3], sigma=draws.sigma[2:3], noise=draws.noise[2:3]), real[2:3])  # fmt: skip
    assert torch.allclose(alone, rendered[2:3], atol=1e-5)
    none = draws._replace(use=torch.zeros(4, dtype=torch.bool))
    assert torch.equal(rendered_features(model, images, captions, none, real), real)


def test_a_later_decoder_stage_trains_on_renditions_from_the_decoder_it_receives(tmp_path: Path) -> None:
    """The refine stage's decoder starts from the one it is handed: with lr 0 it exports it unchanged (the
    first decoder stage would re-initialise a pixel-shuffle branch from CLIP's head; a later one must not)."""
    shards = tmp_path / "data"
    write_shards(shards, n=16, seed=0, progress=False)
    examples, _ = load_shards(shards)
    base = preset("tiny-test")
    model_config = replace(
        base.model,
        clip=replace(base.model.clip, reconstruction_weight=1.0),
        decoder=replace(base.model.decoder, spatial_channels=3, spatial_upsample="pixel_shuffle"),
    )
    refine = StageConfig("refine", "decoder", steps=2, batch_size=4, lr=0.0, warmup_steps=0, log_every=1,
                         ckpt_every=2, generated_share=1.0)  # fmt: skip
    decoder = StageConfig("decoder", "decoder", steps=1, batch_size=4)
    generation = StageConfig("generation", "generation", steps=1, batch_size=4)
    stages = (decoder, generation, refine)
    run = replace(base, model=model_config, stages=stages, data=DataConfig(shards=str(shards)))
    model = Blip3o.from_config(run.model, seed=0)
    with torch.no_grad():
        model.decoder.feature_to_pixels.weight.normal_()  # not what CLIP's head would give
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    dist = init_distributed("cpu")
    result = train_stage(model, refine, 2, run, tmp_path, examples, dist, None, progress=False)
    log = (tmp_path / "refine" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and all("nan" not in line for line in log)
    exported = PixelDecoder.from_pretrained(result.model_dir / "decoder").state_dict()
    assert exported.keys() == before.keys()
    changed = [k for k in before if not torch.equal(exported[k], before[k])]
    assert not changed, changed


def test_a_refine_stage_trains_on_reading_pairs(tmp_path: Path) -> None:
    shards = tmp_path / "data"
    write_shards(shards, n=16, seed=0, progress=False)
    examples, _ = load_shards(shards)
    base = preset("tiny-test")
    refine = StageConfig("refine", "decoder", steps=2, batch_size=4, warmup_steps=0, log_every=1, ckpt_every=2,
                         generated_share=1.0, generated_max_sigma=1.0, generated_pairs="reading")  # fmt: skip
    stages = (StageConfig("generation", "generation", steps=1, batch_size=4), refine)
    run = replace(
        base, model=object_label_model_config(base.model), stages=stages, data=DataConfig(shards=str(shards))
    )
    model = Blip3o.from_config(run.model, seed=0)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    result = train_stage(
        model, refine, 1, run, tmp_path, examples, init_distributed("cpu"), None, progress=False
    )
    log = [json.loads(line) for line in (tmp_path / "refine" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(row["loss"]) for row in log)
    exported = PixelDecoder.from_pretrained(result.model_dir / "decoder").state_dict()
    assert any(not torch.equal(exported[k], before[k]) for k in before)
