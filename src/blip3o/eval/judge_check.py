"""Prompt-level checks of the ShapesGenEval judge (issue 2's acceptance).

- accuracy: render a scene that satisfies an evaluation prompt (optionally degrade it: blur sigma 1 px,
  noise std 8/255, JPEG quality 75) and count how often the judge + GenEval's rules call it correct;
- specificity: render a near-miss scene (one attribute wrong: colour, count, shape, or the relation reversed)
  and count how often they call it wrong.
Both are per category, with overall = the mean of the six categories (as GenEval's score).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from blip3o.eval.geneval import scene_detections, score_detections, summarize
from blip3o.world.conditioned import near_miss_scene, scene_for_prompt
from blip3o.world.prompts import CATEGORIES, load_eval_prompts
from blip3o.world.render import render

DetectFn = Callable[[Image.Image], list]


def _balanced_prompts(n: int, rng: np.random.Generator) -> list[dict]:
    """n evaluation prompts, the same number from each category (cycling through a category's prompts in a
    seeded order), so every category is measured on about n/6 renders."""
    by_tag = {t: [r for r in load_eval_prompts() if r["tag"] == t] for t in CATEGORIES}
    orders = {t: rng.permutation(len(rs)) for t, rs in by_tag.items()}
    tags = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    return [by_tag[t][orders[t][(i // len(CATEGORIES)) % len(by_tag[t])]] for i, t in enumerate(tags)]


def _default_detect() -> DetectFn:
    from blip3o.world.judge import detect

    return detect


def prompt_accuracy(
    n: int = 2000,
    seed: int = 0,
    degraded: bool = False,
    detect: DetectFn | None = None,
    progress: bool = False,
) -> dict:
    """Fraction of renders of prompt-satisfying scenes that the judge scores correct, per category."""
    from blip3o.world.judge_eval import degrade

    detect = detect or _default_detect()
    rng = np.random.default_rng(seed)
    results, failures = [], []
    for record in tqdm(_balanced_prompts(n, rng), desc="judge accuracy", disable=not progress):
        scene = scene_for_prompt(record, rng)
        # The scene itself must satisfy the prompt; otherwise this would measure the sampler, not the judge.
        assert score_detections(record, scene_detections(scene))[0], record["prompt"]
        image = render(scene)
        if degraded:
            image = degrade(image, rng)
        correct, reason = score_detections(record, detect(image))
        results.append({"tag": record["tag"], "correct": correct})
        if not correct:
            failures.append({"prompt": record["prompt"], "reason": reason})
    summary = summarize(results)
    summary["failures"] = failures
    return summary


def near_miss_specificity(
    n: int = 2000, seed: int = 0, detect: DetectFn | None = None, progress: bool = False
) -> dict:
    """Fraction of near-miss renders that the judge scores wrong ('correct' here means: rejected), per category
    and per kind of miss."""
    detect = detect or _default_detect()
    rng = np.random.default_rng(seed)
    results, by_kind, accepted = [], {}, []
    for record in tqdm(_balanced_prompts(n, rng), desc="judge specificity", disable=not progress):
        scene, kind = near_miss_scene(record, rng)
        assert not score_detections(record, scene_detections(scene))[0], record["prompt"]
        rejected = not score_detections(record, detect(render(scene)))[0]
        results.append({"tag": record["tag"], "correct": rejected})
        tally = by_kind.setdefault(kind, [0, 0])
        tally[0] += rejected
        tally[1] += 1
        if not rejected:
            accepted.append({"prompt": record["prompt"], "near_miss": kind})
    summary = summarize(results)
    summary["by_kind"] = {k: {"rejected": r, "renders": t, "rate": r / t} for k, (r, t) in by_kind.items()}
    summary["wrongly_accepted"] = accepted
    return summary
