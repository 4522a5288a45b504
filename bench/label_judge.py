"""Judge a model with an object-centric target on its generated tokens, without the pixel decoder.

    .venv/bin/python bench/label_judge.py MODEL [--prompts 240] [--cfg 1 3] [--seed 0]

For models whose CLIP has an object label head (`ClipConfig.patch_label_kind = "object"`, preset
`shapes-object`): the DiT's samples for balanced ShapesGenEval prompts are mapped back to CLIP features and read
by the label head; each patch it reads as an object becomes a judge detection (`object_label_detections`), scored
by ShapesGenEval's rules. This separates the two halves of generation: what the DiT puts in the tokens (this
score) and what the pixel decoder draws from them (`blip3o eval geneval`). The same read-out on real renders of
a scene built for each prompt is the ceiling: how well the label head reads real images; the head's per-patch
accuracy on those renders (`head_accuracy`) says which part of the reading fails.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from blip3o.eval.geneval import score_detection_lists
from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, object_label_detections, scene_object_labels
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render


def judge_labels(labels: torch.Tensor, records: list[dict]) -> dict:
    """ShapesGenEval of (P, N, 19) label readings, one per prompt record."""
    return score_detection_lists(records, [object_label_detections(reading) for reading in labels])


def head_accuracy(read: torch.Tensor, truth: torch.Tensor) -> dict:
    """How a (B, N, 19) label reading compares with the exact (B, N, 19) labels, per patch: object recall and
    precision (a patch is read as an object when its likeliest shape is not "none"), shape and colour accuracy
    and the mean absolute error of the four values, at the patches that truly hold an object's centre."""
    n_shapes, n_colours = PATCH_LABEL_GROUPS
    holds = truth[..., n_shapes - 1] < 0.5  # (B, N)
    read_holds = read[..., :n_shapes].argmax(-1) != n_shapes - 1  # (B, N)
    hits = int((holds & read_holds).sum())
    at, exact = read[holds], truth[holds]  # (objects, 19) each

    def accuracy(group: slice) -> float:
        return (at[:, group].argmax(-1) == exact[:, group].argmax(-1)).float().mean().item()

    errors = (at[:, n_shapes + n_colours :] - exact[:, n_shapes + n_colours :]).abs().mean(0).tolist()
    return {
        "objects": int(holds.sum()),
        "recall": hits / max(1, int(holds.sum())),
        "precision": hits / max(1, int(read_holds.sum())),
        "shape": accuracy(slice(0, n_shapes - 1)),
        "colour": accuracy(slice(n_shapes, n_shapes + n_colours - 1)),
        **{f"{name}_mae": e for name, e in zip(("dx", "dy", "size", "rotation"), errors, strict=True)},
    }


@torch.no_grad()
def read_targets(model: Blip3o, target: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) DiT targets -> the label head's (B, N, 19) reading of the CLIP features they map back to."""
    clip = model.clip
    raw = clip.denormalize_features(clip.target_to_features(grid_to_tokens(target.float())))  # (B, N, D)
    return clip.patch_labels_from_tokens(raw)


@torch.no_grad()
def read_images(model: Blip3o, images: list) -> torch.Tensor:
    """Real images -> the label head's (B, N, 19) reading of their CLIP tokens."""
    clip = model.clip
    return clip.patch_labels_from_tokens(clip.encode_image_raw(clip.preprocess(images).to(model.device)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder whose CLIP has an object label head")
    parser.add_argument("--prompts", type=int, default=240, help="balanced ShapesGenEval prompts")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="DiT guidance scales")
    parser.add_argument("--steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    clip = model.clip.config
    if not clip.patch_label_weight or clip.patch_label_kind != "object":
        parser.error(
            f"{args.model}: its CLIP has no object label head (ClipConfig.patch_label_kind='object')"
        )
    records = [r for _, r in balanced_subset(load_eval_prompts(), args.prompts)]
    rng = np.random.default_rng(args.seed)
    scenes = [scene_for_prompt(r, rng) for r in records]
    real = read_images(model, [render(scene) for scene in scenes])  # (P, N, 19)
    truth = torch.stack(
        [scene_object_labels(scene, math.isqrt(real.shape[1])) for scene in scenes]
    )  # (P, N, 19)
    result = {
        "model": args.model,
        "prompts": len(records),
        "head": head_accuracy(real, truth),
        "ceiling": judge_labels(real, records),
    }
    prompts = [r["prompt"] for r in records]
    for scale in args.cfg:
        generator = torch.Generator().manual_seed(args.seed)
        target = model.generate_target(prompts, steps=args.steps, cfg_scale=scale, generator=generator)
        result[f"cfg{scale:g}"] = judge_labels(read_targets(model, target), records)
    print(
        "head on real renders: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["head"].items() if k != "objects")
    )
    for key in ["ceiling"] + [f"cfg{s:g}" for s in args.cfg]:
        row = result[key]
        categories = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("found", "overall"))
        print(f"{key:8s} overall {row['overall']:.3f} (any object in {row['found']:.3f}): {categories}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
