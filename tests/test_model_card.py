"""blip3o.eval.model_card: the card's Model section says what the DiT generates, from the run's config."""

from __future__ import annotations

from blip3o.eval.model_card import _model_section
from blip3o.train.config import preset


def _target_and_clip_lines(name: str) -> tuple[str, str]:
    lines = _model_section(preset(name).model.to_dict())
    target = next(line for line in lines if line.startswith("- Generation target"))
    clip = next(line for line in lines if line.startswith("- CLIP"))
    return target, clip


def test_model_section_names_the_target_of_each_recipe() -> None:
    target, clip = _target_and_clip_lines("tiny-test")
    assert "the DiT generates all channels" in target and "auxiliary" not in clip
    target, clip = _target_and_clip_lines("shapes")
    assert "all channels" in target and "redraws each patch's pixels" in clip
    target, clip = _target_and_clip_lines("shapes-object")
    assert "the 19 directions its label head reads" in target
    assert "box centre" in clip and "covered share" not in clip
