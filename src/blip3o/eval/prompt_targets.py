"""Real DiT targets for ShapesGenEval prompts: what the generation probes in bench/ compare the model against.

For each prompt of a category-balanced subset, one ShapesWorld scene that satisfies it is rendered and encoded
into the DiT's target space; the prompt's condition comes from the backbone and queries, as in `generate`.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import numpy as np
import torch

from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render


class PromptTargets(NamedTuple):
    records: list[dict]  # ShapesGenEval prompt records (tag, prompt, ...)
    x0: torch.Tensor  # (B, C, h, w) the renders' DiT targets
    condition: torch.Tensor  # (B, L, H) float32, the prompts' conditions


def parse_sigmas(text: str) -> list[float]:
    """'1,0.9,0.5' -> [1.0, 0.9, 0.5]; ValueError for a level outside [0, 1] or an empty list."""
    sigmas = [float(part) for part in text.split(",") if part.strip()]
    if not sigmas or any(not 0.0 <= s <= 1.0 for s in sigmas):
        raise ValueError(f"noise levels must be a comma-separated list in [0, 1], got {text!r}")
    return sigmas


@torch.no_grad()
def prompt_targets(model: Blip3o, n_prompts: int, seed: int = 0) -> PromptTargets:
    """Targets and conditions for `n_prompts` category-balanced ShapesGenEval prompts (scenes drawn from `seed`)."""
    records = [r for _, r in balanced_subset(load_eval_prompts(), n_prompts)]
    rng = np.random.default_rng(seed)
    renders = [render(scene_for_prompt(r, rng)) for r in records]
    x0 = model.encode_target(renders)  # (B, C, h, w)
    condition = model.condition([r["prompt"] for r in records]).float()  # (B, L, H)
    return PromptTargets(records, x0, condition)


def add_probe_arguments(parser: argparse.ArgumentParser, sigmas: str, prompts: int, seed_help: str) -> None:
    """The arguments every noise-level probe in bench/ takes: the model, the levels, the prompt subset, the
    seed and the torch threads (`load_probe` reads them back)."""
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--sigmas", default=sigmas, help="comma-separated noise levels in [0, 1]")
    parser.add_argument(
        "--prompts", type=int, default=prompts, help="category-balanced ShapesGenEval prompts"
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--threads", type=int, default=2)


def load_probe(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[float], Blip3o, PromptTargets]:
    """The levels, the model (eval mode) and its prompt targets from `add_probe_arguments`' arguments; a bad
    level list exits through `parser.error`."""
    try:
        sigmas = parse_sigmas(args.sigmas)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    return sigmas, model, prompt_targets(model, args.prompts, args.seed)
