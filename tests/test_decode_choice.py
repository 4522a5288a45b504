"""Several pixel decodes per DiT output, the one whose CLIP reading agrees best kept (models/decode_choice.py)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import tokens_to_grid
from blip3o.models.decode_choice import best_candidate, decode_disagreement, decode_disagreements
from blip3o.models.decoder import PixelDecoderConfig
from blip3o.train.scene_supervision import scene_object_labels
from blip3o.world.conditioned import scene_for_prompt
from conftest import object_instruct_batch

GRID = 8


class ExactReader(SimpleNamespace):
    """A CLIP stand-in whose label head reads a target as exact labels (targets here are 19-channel labels)."""

    def __init__(self, object_head: bool = True) -> None:
        super().__init__(
            label_head=object() if object_head else None, config=SimpleNamespace(patch_label_kind="object")
        )

    @staticmethod
    def patch_labels_from_target(tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def _target(scene) -> torch.Tensor:
    """(1, 19, g, g) exact labels of a scene, laid out as a DiT output."""
    return tokens_to_grid(scene_object_labels(scene, GRID)[None])


def _three_stars():
    record = {"tag": "counting", "prompt": "a photo of three stars", "include": [{"class": "star", "count": 3}],
              "exclude": [{"class": "star", "count": 4}]}  # fmt: skip
    return scene_for_prompt(record, np.random.default_rng(0), distractors=0)


def test_disagreement_counts_the_objects_the_readings_do_not_share() -> None:
    scene = _three_stars()
    assert len(scene.objects) == 3
    target = _target(scene)
    clip = ExactReader()
    assert decode_disagreement(clip, target, target).tolist() == [[0.0, 0.0]]
    dropped = _target(dataclasses.replace(scene, objects=scene.objects[:2]))
    missing, distance = decode_disagreement(clip, target, dropped)[0].tolist()
    assert missing == 1.0 and distance == pytest.approx((target - dropped).pow(2).mean().item())
    other = "red" if scene.objects[0].color != "red" else "blue"
    recoloured = _target(
        dataclasses.replace(
            scene, objects=(dataclasses.replace(scene.objects[0], color=other), *scene.objects[1:])
        )
    )
    assert decode_disagreement(clip, target, recoloured)[0, 0].item() == 2.0  # one star lost, one gained
    # Without an object label head only the distance is compared.
    assert decode_disagreement(ExactReader(object_head=False), target, dropped)[0, 0].item() == 0.0


def test_k_decodes_are_scored_as_one_each_and_the_target_is_read_once() -> None:
    scene = _three_stars()
    target = _target(scene)
    dropped = _target(dataclasses.replace(scene, objects=scene.objects[:2]))
    reads = []

    class CountingReader(ExactReader):
        @staticmethod
        def patch_labels_from_target(tokens: torch.Tensor) -> torch.Tensor:
            reads.append(tokens.shape[0])
            return tokens

    clip = CountingReader()
    scores = decode_disagreements(clip, target, [target, dropped, target])
    assert len(reads) == 4  # the DiT output once, each of the 3 decodes once
    for score, decoded in zip(scores, [target, dropped, target], strict=True):
        torch.testing.assert_close(score, decode_disagreement(ExactReader(), target, decoded))
    assert [s[0, 0].item() for s in scores] == [0.0, 1.0, 0.0]


def test_best_candidate_is_lexicographic_and_the_earliest_wins_a_tie() -> None:
    a = torch.tensor([[1.0, 0.1], [0.0, 0.5], [2.0, 0.3]])
    b = torch.tensor([[0.0, 0.9], [0.0, 0.2], [2.0, 0.3]])
    assert best_candidate([a, b]).tolist() == [1, 1, 0]


def test_decode_target_keeps_the_most_faithful_of_k_decodes() -> None:
    torch.manual_seed(0)
    model, _ = object_instruct_batch()
    model.eval()
    target = model.generate_target(
        ["two red circles", "three stars", "a blue square"],
        steps=2,
        generator=torch.Generator().manual_seed(1),
    )
    one = model.decode_target(target, decoder_steps=2, generator=torch.Generator().manual_seed(2))
    # By hand: three decodes in a row from one generator, each read back and compared with the target.
    generator = torch.Generator().manual_seed(2)
    decodes = [model.decode_target(target, decoder_steps=2, generator=generator) for _ in range(3)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(decodes[0], one, strict=True))
    assert not np.array_equal(np.asarray(decodes[0][0]), np.asarray(decodes[1][0]))  # the candidates differ
    scores = [decode_disagreement(model.clip, target, model.encode_target(d)) for d in decodes]
    chosen = best_candidate(scores)
    model.set_decoder_candidates(3)
    kept = model.decode_target(target, decoder_steps=2, generator=torch.Generator().manual_seed(2))
    for row, image in enumerate(kept):
        assert np.array_equal(np.asarray(image), np.asarray(decodes[int(chosen[row])][row]))
    again = model.decode_target(target, decoder_steps=2, generator=torch.Generator().manual_seed(2))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(kept, again, strict=True))


def test_decoder_candidates_are_saved_with_the_model(tmp_path) -> None:
    model, _ = object_instruct_batch()
    model.set_decoder_candidates(4).save_pretrained(tmp_path / "m")
    loaded = Blip3o.from_pretrained(tmp_path / "m")
    assert loaded.config.decoder.sample_candidates == 4 == loaded.decoder.config.sample_candidates
    with pytest.raises(ValueError, match="sample_candidates"):
        model.set_decoder_candidates(0)
    with pytest.raises(ValueError, match="sample_candidates"):
        PixelDecoderConfig(sample_candidates=0)
