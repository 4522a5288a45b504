"""One measurement point of a study variant: ShapesGenEval, sample diversity, CLIP-FD, ShapesVQA and cost.

All variants are measured with the same instrument: the base model's CLIP (never trained by the study), the
same GenEval prompt subset and sampling seed, the same VQA questions.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from blip3o.eval.clip_features import clip_score
from blip3o.eval.diversity import sample_diversity
from blip3o.eval.frechet import clip_frechet_distance
from blip3o.eval.geneval import read_sample_folder
from blip3o.eval.model_eval import balanced_subset, geneval_with_model, seed_dir, vqa_with_model
from blip3o.models.blip3o import Blip3o
from blip3o.study.config import DIVERSITY_PROMPTS, StudyConfig
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render


def reference_images(config: StudyConfig) -> tuple[list[Image.Image], list[str]]:
    """Real renders for CLIP-FD (and their prompts): each GenEval-subset prompt drawn as many times as it gets
    generated images, from scenes that hold exactly what it asks for, so real and generated sets share one
    prompt distribution."""
    images, prompts = [], []
    for index, record in balanced_subset(load_eval_prompts(), config.geneval_prompts):
        for k in range(min(int(record["n_samples"]), config.images_per_prompt)):
            scene = scene_for_prompt(record, np.random.default_rng([config.seed, index, k]), distractors=0)
            images.append(render(scene))
            prompts.append(record["prompt"])
    return images, prompts


def generated_images(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """Every sample image of a GenEval-layout folder and its prompt, in prompt-folder then sample order."""
    images, prompts = [], []
    for prompt in read_sample_folder(folder):
        for path in prompt.images:
            images.append(Image.open(path).convert("RGB"))
            prompts.append(prompt.meta["prompt"])
    return images, prompts


def measure_model(
    model: Blip3o,
    instrument: Blip3o,
    config: StudyConfig,
    folder: Path,
    reference: list[Image.Image],
    progress: bool = True,
) -> dict:
    """Every measurement of one exported model; GenEval's images and scores are written under `folder`.
    `instrument` supplies the measuring CLIP (and its tokenizer): the base model's, for every variant."""
    clip = instrument.clip
    shutil.rmtree(folder, ignore_errors=True)  # a measurement cut short by a crash starts over
    start = time.perf_counter()
    geneval = geneval_with_model(
        model, folder / "geneval", seeds=(config.seed,), steps=config.sample_steps,
        decoder_steps=config.decoder_steps, max_prompts=config.geneval_prompts,
        images_per_prompt=config.images_per_prompt, progress=progress,
    )  # fmt: skip
    fake, prompts = generated_images(seed_dir(folder / "geneval", config.seed))
    frechet = clip_frechet_distance(clip, reference, fake)
    alignment = clip_score(instrument, fake, prompts)
    diversity = sample_diversity(
        model, clip, DIVERSITY_PROMPTS[: config.diversity_prompts], n=config.diversity_samples,
        seed=config.seed, steps=config.sample_steps, decoder_steps=config.decoder_steps,
    )  # fmt: skip
    vqa = vqa_with_model(model, n_questions=config.vqa_questions)
    generate_s = geneval["timing"][config.seed]["generate_s"]  # keyed by the int seed
    return {
        "geneval": {
            "overall": geneval["overall"]["mean"],
            "categories": {k: v["mean"] for k, v in geneval["categories"].items()},
            "images": geneval["images_per_seed"],
        },
        "diversity": {"image": diversity["image"], "target": diversity["target"]},
        "frechet_clip": frechet,
        "clip_score": alignment,
        "vqa": {
            "overall": vqa["overall"]["mean"],
            "per_kind": {k: v["mean"] for k, v in vqa["per_kind"].items()},
            "n": vqa["n"],
        },
        "generation_images_per_s": geneval["images_per_seed"] / max(generate_s, 1e-9),
        "measure_s": time.perf_counter() - start,
    }
