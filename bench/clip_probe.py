"""How much shape and colour a trained CLIP's generation target (the normalised patch tokens) carries.

    .venv/bin/python bench/clip_probe.py runs/dec/clip/clip/model [more model folders...]

The decoder can only draw what the features encode, and the DiT can only learn to produce what they encode,
so this is the first thing to check about a stage-0 CLIP. Two ridge-regression probes, fitted on 600 scenes
and scored on 300 held-out ones (world seed 9,000,001, disjoint from training shards):
  - object probe: for every object of 1-4-object scenes, the token of the patch under the object's centre
    -> its shape (chance 0.2) and colour (chance 0.125);
  - pooled probe: the mean of all tokens of single-object scenes -> shape, colour.
With an auxiliary pixel head (ClipConfig.reconstruction_weight > 0), also the PSNR of its reconstruction of
200 of the scenes. Prints one line per model.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.world.render import render
from blip3o.world.sampler import ObjectSpec, sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES

WORLD_SEED = 9_000_001


def ridge_accuracy(
    x: np.ndarray, labels: list[str], classes: list[str], n_train: int, lam: float = 1.0
) -> float:
    """Fit one-vs-all ridge regression on the first n_train rows, return accuracy on the rest."""
    x = np.c_[x, np.ones(len(x))]
    y = np.eye(len(classes))[[classes.index(v) for v in labels]]
    w = np.linalg.solve(x[:n_train].T @ x[:n_train] + lam * np.eye(x.shape[1]), x[:n_train].T @ y[:n_train])
    return float(np.mean((x[n_train:] @ w).argmax(1) == y[n_train:].argmax(1)))


@torch.no_grad()
def probe(model_dir: str, n_scenes: int = 900) -> dict[str, float]:
    model = Blip3o.from_pretrained(model_dir)
    grid = model.config.clip.target_grid
    rng = np.random.default_rng(WORLD_SEED)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    singles = [sample_scene(rng, specs=[ObjectSpec()]) for _ in range(n_scenes)]
    images = [render(s) for s in scenes]
    if not model.clip.feature_normalization_fitted:  # a clip-stage export: fit on these (unlabelled) images
        model.clip.fit_feature_normalization(model.clip.encode_image_raw(model.clip.preprocess(images)))
    feats = model.encode_image(images).numpy()  # (M, N, D)
    pooled = model.encode_image([render(s) for s in singles]).mean(1).numpy()  # (M, D)
    rows, shapes, colors, split = [], [], [], 0
    for i, scene in enumerate(scenes):
        if i == n_scenes * 2 // 3:
            split = len(rows)
        for obj in scene.objects:
            cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            col, row = min(int(cx / scene.size * grid), grid - 1), min(int(cy / scene.size * grid), grid - 1)
            rows.append(feats[i, row * grid + col])
            shapes.append(obj.shape)
            colors.append(obj.color)
    x = np.stack(rows)
    n_train = n_scenes * 2 // 3
    extra = {}
    if model.clip.pixel_head is not None:  # how well the auxiliary head redraws the images, in [0, 1] pixels
        pixels = model.clip.preprocess(images[:200])  # (B, 3, S, S), CLIP-normalised
        recon = model.clip.reconstruct_pixels(pixels)
        std = model.clip.pixel_std
        mse = float((((recon - pixels) * std) ** 2).mean())
        extra["head_psnr_db"] = 10 * np.log10(1.0 / mse)
    return extra | {
        "object_shape": ridge_accuracy(x, shapes, list(SHAPES), split),
        "object_color": ridge_accuracy(x, colors, list(COLOR_NAMES), split),
        "pooled_shape": ridge_accuracy(pooled, [s.objects[0].shape for s in singles], list(SHAPES), n_train),
        "pooled_color": ridge_accuracy(
            pooled, [s.objects[0].color for s in singles], list(COLOR_NAMES), n_train
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model_dir in args.models:
        r = probe(model_dir)
        print(
            f"{model_dir}: object probe shape {r['object_shape']:.3f} colour {r['object_color']:.3f} | "
            f"pooled probe shape {r['pooled_shape']:.3f} colour {r['pooled_color']:.3f} (chance 0.200 / 0.125)"
            + (f" | pixel head PSNR {r['head_psnr_db']:.1f} dB" if "head_psnr_db" in r else "")
        )


if __name__ == "__main__":
    main()
