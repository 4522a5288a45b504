"""StageConfig.target_tokens: an understanding stage that reads the scene-embedding target in place of a frozen
tower's tokens, for a chosen share of its images."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.train.config import ConfigError, StageConfig
from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import preset
from blip3o.train.scene_supervision import SceneEmbeddingTable, vision_tokens_replaced
from blip3o.train.stages import StageModule, target_token_draws
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


class _Tower(torch.nn.Module):  # stands in for the vision tower: returns its input as the merged tokens
    def forward(self, x):
        return SimpleNamespace(pooler_output=x)


def test_replaced_tokens_go_only_to_the_marked_images_and_the_hook_leaves_with_the_block() -> None:
    tower = _Tower()
    own = torch.randn(3 * 4, 8)  # three images' merged tokens (4 each), batch order
    target = torch.randn(3, 4, 8)
    with vision_tokens_replaced(tower, target, torch.tensor([True, False, True])):
        out = tower(own).pooler_output.reshape(3, 4, 8)
    assert torch.equal(out[0], target[0]) and torch.equal(out[2], target[2])
    assert torch.equal(out[1], own.reshape(3, 4, 8)[1])
    assert torch.equal(tower(own).pooler_output, own)  # gone after the block
    wrong = torch.randn(2, 4, 8)  # two images' tokens for a batch of three
    with (
        pytest.raises(ValueError, match="do not match"),
        vision_tokens_replaced(tower, wrong, torch.ones(2, dtype=torch.bool)),
    ):
        tower(own)
    assert torch.equal(tower(own).pooler_output, own)  # gone after an error too


def test_target_token_draws_follow_each_samples_seed_and_the_share() -> None:
    seeds = list(range(2000))
    draws = target_token_draws(seeds, 0.3)
    assert torch.equal(draws, target_token_draws(seeds, 0.3))  # the same seeds, the same choice
    assert torch.equal(draws[5:9], target_token_draws(seeds[5:9], 0.3))  # whatever the batch around it
    assert abs(draws.float().mean().item() - 0.3) < 0.04
    assert not target_token_draws(seeds[:50], 0.0).any() and target_token_draws(seeds[:50], 1.0).all()


def _batch(images: list[Image.Image], scenes: list) -> dict:
    return {
        "images": images,
        "prompts": ["how many objects are there?"] * len(images),
        "answers": [str(len(s.objects)) for s in scenes],
        "scenes": scenes,
        "seeds": list(range(len(images))),
    }


def test_an_understanding_stage_on_target_tokens_does_not_see_the_pixels() -> None:
    """At share 1 the language model reads the target of each image's scene: other pixels give the same loss;
    without target tokens they do not."""
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(3)]
    rendered = [render(s) for s in scenes]
    blank = [Image.new("RGB", image.size, (128, 128, 128)) for image in rendered]
    on_target = StageModule(model, "understanding", target_tokens=1.0)
    loss, metrics = on_target(_batch(rendered, scenes))
    assert metrics["target_share"] == 1.0
    torch.testing.assert_close(loss, on_target(_batch(blank, scenes))[0], rtol=0, atol=0)
    plain = StageModule(model, "understanding")
    assert plain(_batch(rendered, scenes))[0] != plain(_batch(blank, scenes))[0]
    # The target is the fixed table of a vision stage with scene_embedding_weight (same size, same seed).
    assert torch.equal(
        on_target.target_table.table, SceneEmbeddingTable(model.config.backbone.hidden_size).table
    )
    with pytest.raises(ValueError, match="one scene per image"):
        on_target({**_batch(rendered, scenes), "scenes": None})


def test_target_tokens_config_needs_a_frozen_tower_trained_towards_the_target() -> None:
    StageConfig("und", "understanding", steps=1, batch_size=1, freeze_vision=True, target_tokens=0.5)
    for bad in (
        dict(kind="understanding", freeze_vision=True, target_tokens=1.5),
        dict(kind="understanding", target_tokens=0.5),  # the tower would train under a target it never sees
        dict(kind="generation", target_tokens=0.5),
    ):
        with pytest.raises(ConfigError, match="target_tokens"):
            StageConfig("s", steps=1, batch_size=1, **bad)
    with pytest.raises(ConfigError, match="scene_embedding_weight"):
        apply_overrides(preset("shapes-object"), ["stages.understanding.target_tokens=1.0"])
    config = apply_overrides(
        preset("shapes-object"),
        ["stages.vision.scene_embedding_weight=1", "stages.understanding.target_tokens=1.0"],
    )
    assert config.stage("understanding").target_tokens == 1.0


def test_shapes_object_v2_trains_understanding_on_the_target_relations_first() -> None:
    old, new = preset("shapes-object"), preset("shapes-object-v2")
    names = [s.name for s in new.stages]
    old_names = [s.name for s in old.stages]
    at = old_names.index("understanding")
    assert names == [
        *old_names[:at], "understanding_relations", *old_names[at:], "deep_count", "deep_count_shape", "count_apart",
        "more_count", "more_count_shape", "more_count_apart",
    ]  # fmt: skip
    assert new.stage("vision").scene_embedding_weight == 1.0 and new.stage("vision").steps == 9000
    relations, understanding = new.stage("understanding_relations"), new.stage("understanding")
    for stage in (relations, understanding):
        assert stage.freeze_vision and stage.relation_steps and stage.qa_turns == 8
        assert stage.relation_form == "canonical"  # the form whose last step both seeds learned (session 50)
    assert (relations.target_tokens, understanding.target_tokens) == (1.0, 0.5)
    assert relations.relation_share == 1.0 and relations.qa_share == 1.0
    assert understanding.relation_share == 0.3 and understanding.location_questions
    # The generation side and the model are `shapes-object`'s, with one more stage at the end (session 55):
    # count_shape again, with the two losses read on the model's own samples at high noise (session 56). The model
    # samples 4 decodes per DiT sample and keeps the most faithful (session 58).
    assert new.model == replace(old.model, decoder=replace(old.model.decoder, sample_candidates=4))
    assert [s for s in new.stages if s.kind not in ("vision", "understanding")][:-6] == [
        s for s in old.stages if s.kind not in ("vision", "understanding")
    ]
    # Then count and count_shape again on a DiT deepened 4 -> 6 layers (session 62).
    assert new.stage("deep_count") == replace(old.stage("count"), name="deep_count", deepen_dit_after=(1, 3))
    assert new.stage("deep_count_shape") == replace(old.stage("count_shape"), name="deep_count_shape")
    assert new.stage_model("count_apart").dit.n_layers == new.model.dit.n_layers + 2 == 6
    apart = new.stage("count_apart")
    assert apart == replace(
        old.stage("count_shape"),
        name="count_apart",
        separation_weight=0.3,
        own_count_weight=0.3,
        own_min_sigma=0.6,
    )
    # The same three once more on the 6-layer DiT (session 67), which deepens nothing further.
    for again, first in [("more_count", "deep_count"), ("more_count_shape", "deep_count_shape"),
                         ("more_count_apart", "count_apart")]:  # fmt: skip
        assert new.stage(again) == replace(new.stage(first), name=again, deepen_dit_after=())
    assert new.stage_model("more_count_apart").dit.n_layers == 6
    assert type(new).from_dict(new.to_dict()) == new  # what a run saves, it resumes with
