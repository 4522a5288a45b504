"""bench/caption_locations.py: places and relations in long captions, scored against the scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blip3o.world.language import long_caption
from blip3o.world.sampler import sample_scene
from conftest import load_script

BENCH = load_script(Path(__file__).resolve().parents[1] / "bench" / "caption_locations.py")


def test_true_captions_score_one_and_swapped_places_score_less() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(150)]
    captions = [long_caption(s, rng) for s in scenes]
    truth = BENCH.score_captions(scenes, captions)
    assert truth["placed_objects"] > 150 and truth["relation_sentences"] > 50
    assert truth["row_accuracy"] == truth["column_accuracy"] == truth["relation_accuracy"] == 1.0
    assert 0.3 < truth["row_baseline"] < 0.6 and 0.3 < truth["column_baseline"] < 0.6

    def swap(text: str) -> str:  # every left/right and top/bottom, and every relation, reversed
        pairs = [
            ("left", "RIGHT"),
            ("right", "left"),
            ("top", "BOTTOM"),
            ("bottom", "top"),
            ("above", "BELOW"),
        ]
        pairs += [("below", "above")]
        for a, b in pairs:
            text = text.replace(a, b)
        return text.lower()

    swapped = BENCH.score_captions(scenes, [swap(c) for c in captions])
    assert swapped["placed_objects"] == truth["placed_objects"]
    assert swapped["column_accuracy"] < 0.6 and swapped["row_accuracy"] < 0.6
    assert swapped["relation_accuracy"] == 0.0


def test_statements_about_ambiguous_objects_are_not_scored() -> None:
    rng = np.random.default_rng(3)
    scene = next(s for s in (sample_scene(rng) for _ in range(500)) if len(s.objects) == 1)
    obj = scene.objects[0]
    places, relations = BENCH.caption_statements(scene, f"A {obj.color} {obj.shape} sits in the centre. X.")
    assert len(places) == 1 and relations == []
    other = "red" if obj.color != "red" else "blue"
    assert BENCH.caption_statements(scene, f"A {other} {obj.shape} sits in the centre.") == ([], [])
