"""The DiT's condition resampler and its slot-label scaffolding (generation stages)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from blip3o.data.shards import write_shards
from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.models.condition_resampler import ConditionResampler
from blip3o.models.dit import DiT, DiTConfig
from blip3o.train.config import ConfigError, DataConfig, StageConfig
from blip3o.train.data import instruct_examples, is_colourless_pair, load_shards, make_batch
from blip3o.train.loop import stage_examples, train_stage
from blip3o.train.parallelize import init_distributed
from blip3o.train.presets import preset
from blip3o.train.slot_supervision import (
    NO_OBJECT_COLOR,
    NO_OBJECT_SHAPE,
    NO_RELATION,
    UNNAMED,
    SlotLabelHead,
    caption_slot_labels,
    caption_slot_positions,
    caption_slot_relations,
)
from blip3o.train.stages import StageModule, fit_feature_statistics, parameters_of, set_trainable
from blip3o.world.language import annotate, caption_objects, caption_words
from blip3o.world.prompts import load_train_prompts
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, RELATIONS, SHAPES


def test_caption_objects_reads_counts_colours_and_bare_shapes() -> None:
    assert caption_objects("a photo of two red circles and a star") == [
        ("circle", "red"),
        ("circle", "red"),
        ("star", None),
    ]
    assert caption_objects("a photo of a circle left of a square") == [("circle", None), ("square", None)]
    assert caption_objects("a photo of four stars") == [("star", None)] * 4
    assert caption_objects("purple circle, yellow square and red star") == [
        ("circle", "purple"),
        ("square", "yellow"),
        ("star", "red"),
    ]
    assert caption_objects("a plain light background") == []


def test_caption_words_drop_case_punctuation_and_digits() -> None:
    assert caption_words("A red circle, left of a BLUE star.") == [
        "a",
        "red",
        "circle",
        "left",
        "of",
        "a",
        "blue",
        "star",
    ]
    assert caption_words("3 stars!") == ["stars"]
    assert caption_words("") == []


def test_caption_objects_names_every_scene_object_first() -> None:
    """Short captions name exactly the scene's objects; long ones name them first, then again in relations."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        annotation = annotate(scene, rng)
        objects = Counter((o.shape, o.color) for o in scene.objects)
        assert Counter(caption_objects(annotation.short_caption)) == objects, annotation.short_caption
        named = caption_objects(annotation.long_caption)
        assert Counter(named[: len(scene.objects)]) == objects, annotation.long_caption


def test_slot_labels_order_padding_and_unnamed_colours() -> None:
    scene = next(
        s for s in (sample_scene(np.random.default_rng(i)) for i in range(50)) if len(s.objects) >= 2
    )
    shape, colour = caption_slot_labels("a red circle and two stars", slots=5)
    assert shape.tolist() == [
        SHAPES.index("circle"),
        SHAPES.index("star"),
        SHAPES.index("star"),
        NO_OBJECT_SHAPE,
        NO_OBJECT_SHAPE,
    ]
    assert colour.tolist() == [COLOR_NAMES.index("red"), UNNAMED, UNNAMED, NO_OBJECT_COLOR, NO_OBJECT_COLOR]
    # With the scene, only its first len(objects) mentions count (the rest are relation sentences).
    caption = annotate(scene, np.random.default_rng(0)).long_caption
    shape, _ = caption_slot_labels(caption, slots=9, scene=scene)
    assert int((shape != NO_OBJECT_SHAPE).sum()) == len(scene.objects) < len(caption_objects(caption))
    shape, _ = caption_slot_labels("two red circles and a star", slots=2)  # more objects than slots: cut
    assert shape.tolist() == [SHAPES.index("circle")] * 2


def test_slot_head_loss_is_the_cross_entropy_of_named_classes() -> None:
    torch.manual_seed(0)
    head = SlotLabelHead(16)
    tokens = torch.randn(2, 3, 16)
    captions = ["a blue square", "two stars"]
    loss, metrics = head.loss(tokens, captions)
    shape_y = torch.tensor(
        [
            SHAPES.index("square"),
            NO_OBJECT_SHAPE,
            NO_OBJECT_SHAPE,
            SHAPES.index("star"),
            SHAPES.index("star"),
            NO_OBJECT_SHAPE,
        ]
    )
    colour_y = torch.tensor(
        [COLOR_NAMES.index("blue"), NO_OBJECT_COLOR, NO_OBJECT_COLOR, UNNAMED, UNNAMED, NO_OBJECT_COLOR]
    )
    flat = tokens.reshape(6, 16)
    expected = F.cross_entropy(head.shape(flat), shape_y) + F.cross_entropy(
        head.colour(flat), colour_y, ignore_index=UNNAMED
    )
    torch.testing.assert_close(loss, expected)
    assert 0.0 <= metrics["slot_shape_acc"] <= 1.0 and 0.0 <= metrics["slot_colour_acc"] <= 1.0
    with pytest.raises(ValueError, match="captions"):
        head.loss(tokens, captions[:1])


def test_resampler_gives_fixed_slots_whatever_the_condition_length() -> None:
    torch.manual_seed(0)
    resampler = ConditionResampler(width=32, slots=5, layers=2, heads=4)
    short, long = resampler(torch.randn(3, 7, 32)), resampler(torch.randn(3, 64, 32))
    assert short.shape == long.shape == (3, 5, 32)
    assert not torch.allclose(short[0, 0], short[0, 1])  # slots differ from each other
    null = resampler(torch.zeros(2, 7, 32))  # the unconditional branch: the same learnt slots for every row
    torch.testing.assert_close(null[0], null[1])


def test_resampler_slots_do_not_read_masked_condition_tokens() -> None:
    torch.manual_seed(0)
    resampler = ConditionResampler(width=32, slots=5, layers=2, heads=4)
    condition = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, :3] = True  # row 0's first three tokens are padding
    with torch.no_grad():
        torch.testing.assert_close(
            resampler(condition, padding * False), resampler(condition), rtol=0, atol=0
        )
        masked = resampler(condition, padding)
        changed = condition.clone()
        changed[0, :3] = torch.randn(3, 32)  # what the padding holds does not matter
        torch.testing.assert_close(resampler(changed, padding), masked, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(masked[0], resampler(condition[:1, 3:])[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(masked[1], resampler(condition)[1], rtol=1e-5, atol=1e-6)


def test_dit_with_resampler_reads_slots_and_round_trips(tmp_path: Path) -> None:
    config = DiTConfig.tiny(condition_slots=4)
    dit = DiT(config)
    assert dit.resampler is not None and DiT(DiTConfig.tiny()).resampler is None
    condition = torch.randn(2, 6, config.latent_embedding_size)
    assert dit.resample_condition(condition).shape == (2, 4, config.latent_embedding_size)
    x, t = torch.randn(2, config.in_channels, 4, 4), torch.tensor([10.0, 900.0])
    # The transformer reads the slots: its output changes with the condition through them.
    with torch.no_grad():
        for parameter in dit.parameters():  # adaLN-Zero, zero gates and output would hide any change
            parameter.add_(0.1 * torch.randn_like(parameter))
        first, second = dit(x, t, condition), dit(x, t, torch.randn_like(condition))
    assert not torch.allclose(first, second)
    assert DiTConfig.from_dict(config.to_dict()) == config
    for bad in (
        {"condition_slots": -1},
        {"condition_resampler_layers": 0},
        {"condition_slots": 2, "condition_resampler_heads": 5},
    ):
        with pytest.raises(ValueError, match="condition_"):
            DiTConfig.tiny(**bad)


def test_slot_label_weight_checks() -> None:
    with pytest.raises(ConfigError, match="slot_label_weight"):
        StageConfig("clip", "clip", steps=1, batch_size=1, slot_label_weight=1.0)
    with pytest.raises(ConfigError, match="slot_label_weight"):
        StageConfig("gen", "generation", steps=1, batch_size=1, slot_label_weight=-1.0)
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)
    with pytest.raises(ValueError, match="condition_slots"):
        StageModule(model, "generation", slot_label_weight=1.0)


def test_generation_stage_trains_the_slots_checkpoints_the_head_and_exports_without_it(
    tmp_path: Path,
) -> None:
    shards = tmp_path / "data"
    write_shards(shards, n=16, seed=0, progress=False)
    examples, _ = load_shards(shards)
    stage = StageConfig("generation", "generation", steps=6, batch_size=4, lr=1e-3, log_every=1, ckpt_every=3,
                        slot_label_weight=1.0)  # fmt: skip
    base = preset("tiny-test")
    model_config = replace(base.model, dit=replace(base.model.dit, condition_slots=4))
    run = replace(base, model=model_config, stages=(stage,), data=DataConfig(shards=str(shards)))
    model = Blip3o.from_config(run.model, seed=0)
    module = StageModule(model, "generation", slot_label_weight=1.0)
    assert any(n.startswith("slot_head.") for n, _ in parameters_of(module))
    dist = init_distributed("cpu")
    first = train_stage(model, stage, 0, run, tmp_path, examples, dist, None, progress=False, stop_after_s=0)
    record = json.loads((tmp_path / "generation" / "log.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["slot_shape_acc"] <= 1.0 and record["gen_loss"] < record["loss"]
    saved = load_file(
        tmp_path / "generation" / "checkpoints" / f"step_{first.end_step:08d}" / "model.safetensors"
    )
    assert any(k.startswith("slot_head.") for k in saved)
    exported = Blip3o.from_pretrained(first.model_dir)
    names = list(exported.state_dict())
    assert any(n.startswith("dit.resampler.") for n in names) and not any("slot_head" in n for n in names)
    second = train_stage(
        Blip3o.from_config(run.model, seed=0), stage, 0, run, tmp_path, examples, dist, None, progress=False,
        stop_after_s=0,
    )  # fmt: skip
    assert second.end_step == first.end_step + 1  # resumed, head included


def test_slot_positions_follow_the_caption_order_and_carry_its_relation() -> None:
    examples = instruct_examples(0, 1)
    lefts = [e for e in examples if " left of " in e.long_caption][:40]
    assert lefts
    for example in lefts:
        centres, known = caption_slot_positions(example.long_caption, 9, example.scene)
        assert known.tolist() == [True, True] + [False] * 7, example.long_caption
        assert centres[0, 0] < centres[1, 0], example.long_caption  # the first-named object is the left one
    # Scenes list their objects in their own order: matching is by shape and named colour, not by index.
    swapped = next(e for e in examples if caption_objects(e.long_caption)[0][0] != e.scene.objects[0].shape)
    centres, known = caption_slot_positions(swapped.long_caption, 9, swapped.scene)
    first = caption_objects(swapped.long_caption)[0]
    owner = next(o for o in swapped.scene.objects if o.shape == first[0] and first[1] in (None, o.color))
    assert known[0] and torch.allclose(centres[0], torch.tensor(owner.center) / swapped.scene.size)


def test_slot_position_loss_is_the_mse_over_slots_with_an_object() -> None:
    torch.manual_seed(0)
    examples = instruct_examples(0, 1, 30)
    captions, scenes = [e.long_caption for e in examples[:3]], [e.scene for e in examples[:3]]
    head = SlotLabelHead(16, position=True)
    tokens = torch.randn(3, 4, 16)
    loss, metrics = head.position_loss(tokens, captions, scenes)
    labels = [caption_slot_positions(c, 4, s) for c, s in zip(captions, scenes, strict=True)]
    centres, known = torch.stack([c for c, _ in labels]), torch.stack([k for _, k in labels])
    expected = (head.position(tokens) - centres).pow(2).sum(-1)[known].mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["slot_position_mae"] > 0
    with pytest.raises(ValueError, match="scene"):
        head.position_loss(tokens, captions, [None, *scenes[1:]])
    with pytest.raises(ValueError, match="position regressor"):
        SlotLabelHead(16).position_loss(tokens, captions, scenes)
    with pytest.raises(ConfigError, match="slot_position_weight"):
        StageConfig("clip", "clip", steps=1, batch_size=1, slot_position_weight=1.0)


def test_instruct_step_with_the_position_loss_trains_the_resampler_and_the_regressor() -> None:
    base = preset("tiny-test")
    model = Blip3o.from_config(replace(base.model, dit=replace(base.model.dit, condition_slots=4)), seed=0)
    examples = instruct_examples(0, 1, 8)
    fit_feature_statistics(model, [e.image for e in examples])
    module = StageModule(model, "instruct", slot_label_weight=1.0, slot_position_weight=1.0)
    set_trainable(model, "instruct")
    batch = make_batch("instruct", examples, list(range(4)), list(range(4)), seed=0, short_prob=0.0)
    loss, metrics = module(batch)
    assert torch.isfinite(loss) and {"slot_position_mae", "slot_shape_acc", "gen_loss"} <= set(metrics)
    loss.backward()
    assert module.slot_head.position.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.resampler.parameters())


def test_slot_relations_give_each_object_its_own_side_of_a_position_phrase() -> None:
    left, right, above, below = (RELATIONS.index(r) for r in ("left of", "right of", "above", "below"))
    labels = caption_slot_relations("a photo of a red circle left of a blue star", 4)
    assert labels.tolist() == [left, right, UNNAMED, UNNAMED]
    assert caption_slot_relations("a photo of a square below a cross", 3).tolist() == [below, above, UNNAMED]
    # No relation stated: every named object's slot is "none", the empty slots are ignored.
    assert caption_slot_relations("a photo of three circles", 5).tolist() == [NO_RELATION] * 3 + [UNNAMED] * 2
    # Location words are not relations ("in the top left"); relation sentences among more objects are ignored.
    assert caption_slot_relations("a red circle is in the top left.", 2).tolist() == [NO_RELATION, UNNAMED]
    rng = np.random.default_rng(0)
    longs = [annotate(sample_scene(rng), rng).long_caption for _ in range(40)]
    related = [c for c in longs if any(f" {r} " in c for r in RELATIONS)]
    assert len(related) >= 5
    for caption in related:
        assert (caption_slot_relations(caption, 9) == UNNAMED).all(), caption
    # On the instruct set every position prompt is labelled (both objects), and only those.
    examples = instruct_examples(0, 1)
    for example in examples:
        labels = caption_slot_relations(example.long_caption, 9)
        positional = any(f" {r} " in example.long_caption for r in RELATIONS)
        assert (
            (labels[:2] < NO_RELATION).all()
            if positional
            else (labels[labels != UNNAMED] == NO_RELATION).all()
        )


def test_slot_relation_loss_is_the_cross_entropy_of_labelled_slots() -> None:
    torch.manual_seed(0)
    captions = ["a photo of a circle above a star", "a photo of two squares", "a photo of a cross"]
    head = SlotLabelHead(16, relation=True)
    tokens = torch.randn(3, 4, 16)
    loss, metrics = head.relation_loss(tokens, captions)
    labels = torch.cat([caption_slot_relations(c, 4) for c in captions])
    logits = head.relation(tokens.reshape(-1, 16))
    keep = labels != UNNAMED
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], labels[keep]))
    torch.testing.assert_close(
        metrics["slot_relation_acc"], (logits.argmax(1) == labels)[keep].float().mean()
    )
    # A batch without a labelled slot: zero loss, same metric keys (distributed logging reduces them by key).
    empty, empty_metrics = head.relation_loss(tokens[:, :0], captions)
    assert empty.item() == 0.0 and set(empty_metrics) == {"slot_relation_acc"}
    with pytest.raises(ValueError, match="relation classifier"):
        SlotLabelHead(16).relation_loss(tokens, captions)
    with pytest.raises(ValueError, match="captions"):
        head.relation_loss(tokens, captions[:2])
    with pytest.raises(ConfigError, match="slot_relation_weight"):
        StageConfig("clip", "clip", steps=1, batch_size=1, slot_relation_weight=1.0)
    with pytest.raises(ConfigError, match="slot_relation_weight"):
        StageConfig("gen", "generation", steps=1, batch_size=1, slot_relation_weight=-0.5)


def test_instruct_step_with_the_relation_loss_trains_the_resampler_and_the_classifier() -> None:
    base = preset("tiny-test")
    model = Blip3o.from_config(replace(base.model, dit=replace(base.model.dit, condition_slots=4)), seed=0)
    examples = [e for e in instruct_examples(0, 1) if " left of " in e.long_caption][:4]
    fit_feature_statistics(model, [e.image for e in examples])
    module = StageModule(model, "instruct", slot_relation_weight=1.0)
    set_trainable(model, "instruct")
    batch = make_batch("instruct", examples, list(range(4)), list(range(4)), seed=0, short_prob=0.0)
    loss, metrics = module(batch)
    assert torch.isfinite(loss) and {"slot_relation_acc", "gen_loss"} <= set(metrics)
    assert loss > metrics["gen_loss"]  # the relation term is in the loss
    loss.backward()
    assert module.slot_head.relation.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.resampler.parameters())


def test_instruct_examples_render_colourless_pairs_more_often(monkeypatch) -> None:
    prompts = load_train_prompts()
    picked = [
        next(r for r in prompts if r["tag"] == "color_attr"),  # two kinds, coloured
        next(r for r in prompts if r["tag"] == "counting" and "color" not in r["include"][0]),  # one kind
        next(r for r in prompts if r["tag"] == "position" and "color" not in r["include"][0]),
        next(r for r in prompts if r["tag"] == "two_object"),
    ]
    assert [is_colourless_pair(r) for r in picked] == [False, False, True, True]
    monkeypatch.setattr("blip3o.train.data.load_train_prompts", lambda: picked)
    plain = instruct_examples(0, 2)
    weighted = instruct_examples(0, 2, colourless_pair_renders=5)
    assert Counter(e.long_caption for e in plain) == Counter({r["prompt"]: 2 for r in picked})
    assert Counter(e.long_caption for e in weighted) == Counter(
        {r["prompt"]: 5 if is_colourless_pair(r) else 2 for r in picked}
    )
    # A prompt's renders are consecutive and its first two are the plain data's: the option only adds scenes.
    starts = np.cumsum([0] + [5 if is_colourless_pair(r) else 2 for r in picked])[:-1]
    first_two = [weighted[start + k] for start in starts for k in range(2)]
    assert [e.image.tobytes() for e in first_two] == [e.image.tobytes() for e in plain]
    with pytest.raises(ConfigError, match="colourless_pair_renders must be >= 0"):
        StageConfig("relation", "instruct", 10, 4, colourless_pair_renders=-1)
    with pytest.raises(ConfigError, match="applies to instruct stages and decoder stages with prompt_scenes"):
        StageConfig("generation", "generation", 10, 4, colourless_pair_renders=12)
    # The bundled model's recipe gives them to its last stages only: measured in `relation`, kept after it.
    object_stages = preset("shapes-object").stages
    assert {s.name: s.colourless_pair_renders for s in object_stages if s.kind == "instruct"} == {
        "instruct": 0,
        "relation": 12,
        "count": 12,
        "count_shape": 12,
    }


def test_instruct_examples_render_counting_prompts_more_often(monkeypatch) -> None:
    prompts = load_train_prompts()
    picked = [next(r for r in prompts if r["tag"] == tag) for tag in ("counting", "position", "colors")]
    monkeypatch.setattr("blip3o.train.data.load_train_prompts", lambda: picked)
    weighted = instruct_examples(0, 2, counting_renders=6)
    assert Counter(e.long_caption for e in weighted) == Counter(
        {r["prompt"]: 6 if r["tag"] == "counting" else 2 for r in picked}
    )
    want = picked[0]["include"][0]
    # Every render holds exactly the count asked for (no distractors): more data, not other data.
    counting = [e for e in weighted if e.long_caption == picked[0]["prompt"]]
    assert all(sum(o.shape == want["class"] for o in e.scene.objects) == want["count"] for e in counting)
    with pytest.raises(ConfigError, match="counting_renders must be >= 0"):
        StageConfig("relation", "instruct", 10, 4, counting_renders=-1)
    with pytest.raises(
        ConfigError, match="counting_renders applies to instruct stages and decoder stages with"
    ):
        StageConfig("generation", "generation", 10, 4, counting_renders=12)
    with pytest.raises(
        ConfigError, match="counting_renders applies to instruct stages and decoder stages with"
    ):
        StageConfig("refine", "decoder", 10, 4, counting_renders=12)


def test_decoder_stage_with_prompt_scenes_trains_on_the_prompt_renders(monkeypatch) -> None:
    prompts = load_train_prompts()
    picked = [next(r for r in prompts if r["tag"] == tag) for tag in ("counting", "position")]
    monkeypatch.setattr("blip3o.train.data.load_train_prompts", lambda: picked)
    config = preset("tiny-test")
    shards = ["the run's shards"]
    plain = StageConfig("refine", "decoder", 10, 4)
    assert stage_examples(plain, config, shards) is shards
    prompted = StageConfig("refine", "decoder", 10, 4, prompt_scenes=True, counting_renders=3)
    examples = stage_examples(prompted, config, shards)
    renders = config.data.instruct_renders
    assert Counter(e.long_caption for e in examples) == Counter(
        {picked[0]["prompt"]: 3, picked[1]["prompt"]: renders}
    )
    # the same scenes an instruct stage with these settings trains on
    instruct = StageConfig("count", "instruct", 10, 4, counting_renders=3)
    same = stage_examples(instruct, config, shards)
    assert [e.image.tobytes() for e in examples] == [e.image.tobytes() for e in same]
    with pytest.raises(ConfigError, match="prompt_scenes applies to decoder stages only"):
        StageConfig("count", "instruct", 10, 4, prompt_scenes=True)
