"""Judge a model with an object-centric target on its generated tokens, without the pixel decoder.

    .venv/bin/python bench/label_judge.py MODEL [--prompts 240] [--cfg 1 3] [--seed 0] [--pixels [--grid PNG]]

For models whose CLIP has an object label head (`ClipConfig.patch_label_kind = "object"`, preset
`shapes-object`): the DiT's samples for balanced ShapesGenEval prompts are mapped back to CLIP features and read
by the label head; each patch it reads as an object becomes a judge detection (`object_label_detections`), scored
by ShapesGenEval's rules. This separates the two halves of generation: what the DiT puts in the tokens (this
score) and what the pixel decoder draws from them (`blip3o eval geneval`). The same read-out on real renders of
a scene built for each prompt is the ceiling: how well the label head reads real images; the head's per-patch
accuracy on those renders (`head_accuracy`) says which part of the reading fails.

With `--pixels` the model's own decoder also draws the same tokens and the pixel judge scores the images, prompt
by prompt beside the tokens' verdicts: how many prompts pass in both, in the tokens only (lost by the decoder), in
the pixels only, in neither. `--grid` draws the prompts lost by the decoder, each labelled with every object the
pixel judge segmented and its shape confidence (an object drawn in its colour but scored 0 is an outline the
judge does not recognise; docs/bench/object_target.txt, session 25).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from blip3o.eval.geneval import detection_verdicts, score_detection_lists
from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens
from blip3o.train.scene_supervision import PATCH_LABEL_GROUPS, object_label_detections, scene_object_labels
from blip3o.viz import image_grid
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.judge import detect, find_candidates, load_shape_model
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render


def judge_labels(labels: torch.Tensor, records: list[dict]) -> dict:
    """ShapesGenEval of (P, N, 19) label readings, one per prompt record."""
    return score_detection_lists(records, [object_label_detections(reading) for reading in labels])


AGREEMENT_KEYS = ("both", "tokens_only", "pixels_only", "neither")


def verdict_agreement(token_pass: list[bool], pixel_pass: list[bool]) -> dict:
    """How many prompts pass in both judges, in the tokens only, in the pixels only and in neither."""
    pairs = list(zip(token_pass, pixel_pass, strict=True))
    counts = (
        sum(t and p for t, p in pairs),
        sum(t and not p for t, p in pairs),
        sum(p and not t for t, p in pairs),
        sum(not t and not p for t, p in pairs),
    )
    return dict(zip(AGREEMENT_KEYS, counts, strict=True))


def judged_labels(images: list, records: list[dict]) -> list[str]:
    """Per image: its prompt, then every object the pixel judge segmented, with its shape confidence."""
    shapes = load_shape_model()
    labels = []
    for image, record in zip(images, records, strict=True):
        found = " ".join(
            f"{c.color or '?'} {c.shape} {c.shape_confidence:.2f}" for c in find_candidates(image, shapes)
        )
        labels.append(f"{record['prompt'].removeprefix('a photo of ')} | judge: {found or 'nothing'}")
    return labels


def lost_grid(images: list, records: list[dict]):
    """The images of prompts lost by the decoder, each labelled by `judged_labels`."""
    return image_grid(images, judged_labels(images, records), columns=8, cell=128, label_lines=4,
                      title="tokens pass, pixels fail: objects segmented by the pixel judge, shape confidence")  # fmt: skip


@torch.no_grad()
def decoded_verdicts(
    model: Blip3o, target: torch.Tensor, records: list[dict], seed: int
) -> tuple[dict, list, list]:
    """The model's decoder draws (P, C, g, g) targets (decoder seed `seed`): the pixel judge's score, each
    prompt's verdict and the images."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(target), 60):
        images += model.decode_target(target[start : start + 60], generator=generator)
    detections = [detect(image) for image in images]
    verdicts = detection_verdicts(records, detections)
    return score_detection_lists(records, detections, verdicts), verdicts, images


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
    return model.clip.patch_labels_from_target(grid_to_tokens(target.float()))


def load_label_model(path: str, parser: argparse.ArgumentParser) -> Blip3o:
    """The saved model at `path`, in eval mode; a usage error when its CLIP has no object label head."""
    model = Blip3o.from_pretrained(path).eval()
    clip = model.clip.config
    if not clip.patch_label_weight or clip.patch_label_kind != "object":
        parser.error(f"{path}: its CLIP has no object label head (ClipConfig.patch_label_kind='object')")
    return model


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
    parser.add_argument("--pixels", action="store_true", help="also draw the tokens with the model's decoder")
    parser.add_argument("--grid", help="with --pixels: a PNG of the prompts the decoder loses (last CFG)")
    args = parser.parse_args(argv)
    if args.grid and not args.pixels:
        parser.error("--grid needs --pixels")
    torch.set_num_threads(args.threads)
    model = load_label_model(args.model, parser)
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
        tokens = [object_label_detections(reading) for reading in read_targets(model, target)]
        token_pass = detection_verdicts(records, tokens)
        result[f"cfg{scale:g}"] = score_detection_lists(records, tokens, token_pass)
        if args.pixels:
            pixels, pixel_pass, images = decoded_verdicts(model, target, records, args.seed)
            result[f"cfg{scale:g}_pixels"] = {**pixels, **verdict_agreement(token_pass, pixel_pass)}
            lost = [i for i, (t, p) in enumerate(zip(token_pass, pixel_pass, strict=True)) if t and not p]
            if args.grid and lost:
                lost_grid([images[i] for i in lost], [records[i] for i in lost]).save(args.grid)
    print(
        "head on real renders: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["head"].items() if k != "objects")
    )
    keys = [f"cfg{s:g}{part}" for s in args.cfg for part in ("", "_pixels") if f"cfg{s:g}{part}" in result]
    for key in ["ceiling", *keys]:
        row = result[key]
        agreement = {k: row[k] for k in AGREEMENT_KEYS if k in row}
        categories = ", ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k not in ("found", "overall", *agreement)
        )
        print(f"{key:8s} overall {row['overall']:.3f} (any object in {row['found']:.3f}): {categories}")
        if agreement:
            print("         prompts passing: " + ", ".join(f"{k} {v}" for k, v in agreement.items()))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
