"""Shared test helpers: single-threaded torch for small models, an untrained tiny model on disk, a model config
with the object-centric label target and such a tiny model, and loading a script (bench/, tools/) as a module."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def restore_deterministic_algorithms() -> Iterator[None]:
    """Training with `deterministic=True` turns torch's deterministic algorithms on process-wide; restore the flag
    after each test so later tests in the same worker run as they would alone (a rank-deficient lstsq gave a
    different solution under it)."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The machine is shared and these models are too small to gain from more than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def changed_parts(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    """The top-level parts (`backbone.<child>` for the backbone) whose parameters differ between two models."""
    return {
        name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("backbone") else "")
        for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
        if not torch.equal(a, b)
    }


def load_script(path: Path) -> ModuleType:
    """Import a script that is not part of the package (bench/, tools/) as a module named after its file. Its
    folder is on sys.path while it loads, as when it runs, so it can import its siblings."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def save_untrained_tiny_model(folder: Path):
    """An untrained tiny Blip3o (CLIP feature statistics fitted on 8 renders, as training does), saved to
    `folder`; returns the model."""
    from blip3o.models.blip3o import Blip3o, tiny_config
    from blip3o.train.stages import fit_feature_statistics
    from blip3o.world.render import render
    from blip3o.world.sampler import sample_scene

    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0).eval()
    rng = np.random.default_rng(0)
    fit_feature_statistics(model, [render(sample_scene(rng)) for _ in range(8)])
    model.save_pretrained(folder)
    return model


def save_moved_tiny_test_model(folder: Path) -> Path:
    """A float16 model of the tiny-test run's config with every weight moved off its initial value (so no weight
    a tool must carry over equals its initialisation by chance), saved to `folder`; returns `folder`."""
    from blip3o.models.blip3o import Blip3o
    from blip3o.train.presets import preset

    model = Blip3o.from_config(preset("tiny-test").model, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(folder, dtype=torch.float16)
    return folder


def tiny_object_label_model(corpus_scenes: int = 100):
    """An untrained tiny Blip3o with CLIP's object label head (`object_label_model_config`), its CLIP feature
    statistics fitted on 8 renders as training does (not saved, train mode as built)."""
    from blip3o.models.blip3o import Blip3o, tiny_config
    from blip3o.train.stages import fit_feature_statistics
    from blip3o.world.render import render
    from blip3o.world.sampler import sample_scene

    model = Blip3o.from_config(
        object_label_model_config(tiny_config(tokenizer_corpus_scenes=corpus_scenes)), seed=0
    )
    rng = np.random.default_rng(0)
    fit_feature_statistics(model, [render(sample_scene(rng)) for _ in range(8)])
    return model


def object_label_model_config(model_config):
    """`model_config` with CLIP's object label head, the DiT generating its 19 label components (as the
    `shapes-object` preset's model does)."""
    from dataclasses import replace

    from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, PATCH_LABEL_VALUES

    clip = replace(model_config.clip, patch_label_weight=1.0, patch_label_groups=PATCH_LABEL_GROUPS,
                   patch_label_values=PATCH_LABEL_VALUES, patch_label_kind="object", target_basis="labels",
                   target_components=19)  # fmt: skip
    return replace(model_config, clip=clip, dit=replace(model_config.dit, in_channels=19))


def object_slot_model():
    """tiny-test's model with CLIP's object label head and a 4-slot condition resampler: what the instruct
    stages' guided and own-trajectory losses need."""
    from dataclasses import replace

    from blip3o.models.blip3o import Blip3o
    from blip3o.train.presets import preset

    config = object_label_model_config(preset("tiny-test").model)
    return Blip3o.from_config(replace(config, dit=replace(config.dit, condition_slots=4)), seed=0)


def object_instruct_batch():
    """(`object_slot_model()` with its feature statistics fitted and set up for an instruct stage, a batch of
    4 rendered GenEval-style training prompts)."""
    from blip3o.train.data import instruct_examples, make_batch
    from blip3o.train.stages import fit_feature_statistics, set_trainable

    model = object_slot_model()
    examples = instruct_examples(0, 1)[:4]
    fit_feature_statistics(model, [e.image for e in examples])
    set_trainable(model, "instruct")
    batch = make_batch("instruct", examples, list(range(4)), list(range(4)), seed=0, short_prob=0.0)
    return model, batch
