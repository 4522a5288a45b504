"""Real DiT targets for ShapesGenEval prompts (blip3o.eval.prompt_targets), as the bench probes use them."""

from __future__ import annotations

import argparse

import pytest
import torch

import blip3o.eval.prompt_targets as prompt_targets_module
from blip3o.eval.geneval import score_detections
from blip3o.eval.prompt_targets import add_probe_arguments, load_probe, parse_sigmas, prompt_targets
from blip3o.world.judge import detect
from blip3o.world.prompts import CATEGORIES


def test_parse_sigmas_reads_levels_and_refuses_bad_ones():
    assert parse_sigmas("1,0.9, 0.5,0") == [1.0, 0.9, 0.5, 0.0]
    assert parse_sigmas("0.3,") == [0.3]
    for bad in ("", "1.2", "-0.1,0.5", ","):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            parse_sigmas(bad)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, one_thread):
    from conftest import save_untrained_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    return save_untrained_tiny_model(folder), folder


@pytest.fixture(scope="module")
def model(model_folder):
    return model_folder[0]


def test_load_probe_reads_the_shared_arguments(model_folder):
    parser = argparse.ArgumentParser()
    add_probe_arguments(parser, "1,0.5", 6, "seed")
    sigmas, loaded, targets = load_probe(parser, parser.parse_args([str(model_folder[1]), "--threads", "1"]))
    assert sigmas == [1.0, 0.5]
    assert not loaded.training
    assert len(targets.records) == 6 and targets.x0.shape[0] == 6
    with pytest.raises(SystemExit):  # parser.error, before any model is loaded
        load_probe(parser, parser.parse_args(["no/such/model", "--sigmas", "1.5"]))


def test_prompt_targets_shapes_categories_and_seed(model):
    records, x0, condition = prompt_targets(model, 12, seed=0)
    assert len(records) == 12
    assert {r["tag"] for r in records} == set(CATEGORIES)  # category-balanced: 2 of each of the 6
    assert x0.shape == (12, *model.config.target_shape)
    assert condition.shape == (12, model.config.backbone.n_queries, model.config.backbone.hidden_size)
    assert condition.dtype == torch.float32

    again = prompt_targets(model, 12, seed=0)
    assert torch.equal(again.x0, x0)  # same seed, same scenes
    assert not torch.equal(prompt_targets(model, 12, seed=1).x0, x0)  # another seed draws other scenes


def test_prompt_targets_renders_satisfy_their_prompts(model, monkeypatch):
    """The targets encode scenes that pass the judge for their own prompt (captured before encoding)."""
    rendered = []
    real_render = prompt_targets_module.render

    def recording_render(scene):
        rendered.append(real_render(scene))
        return rendered[-1]

    monkeypatch.setattr(prompt_targets_module, "render", recording_render)
    records, _, _ = prompt_targets(model, 12, seed=0)
    passed = [score_detections(r, detect(image))[0] for r, image in zip(records, rendered, strict=True)]
    assert sum(passed) >= 11, passed
