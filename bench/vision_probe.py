"""Does a model's vision encode what ShapesVQA asks? Linear probes on single-object ShapesWorld scenes.

    .venv/bin/python bench/vision_probe.py runs/shapes/final [--images 3000]

Two representations are probed: the backbone's merged vision tokens (what the language model reads) and the
CLIP target tokens (what the DiT generates). Each image's tokens are pooled to mean, max and min over tokens
(a translation-invariant summary, since the object can be anywhere), then clip_probe.py's one-vs-all ridge
classifier is fitted on 5/6 of the images and scored on the rest, for the object's shape and for its colour. The figures are held-out
accuracies against chance; a vision tower whose shape probe is near chance cannot support shape questions,
whatever the language model learns.

A third probe reads each merged vision token on its own (not pooled) for the row and the column of its grid
cell: whether a token's content says where it is, which relation questions ("is the red circle left of the
blue star?") need once the language model has found the object (see train/scene_supervision.py).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.world.render import render
from blip3o.world.sampler import ObjectSpec, sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES
from clip_probe import ridge_accuracy  # bench/ is on sys.path when this script runs


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, 3D): mean, max and min over the tokens."""
    return torch.cat([tokens.mean(1), tokens.amax(1), tokens.amin(1)], dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    torch.set_grad_enabled(False)
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, [ObjectSpec()]) for _ in range(args.images)]
    images = [render(s) for s in scenes]
    labels = {
        "shape": ([s.objects[0].shape for s in scenes], list(SHAPES)),
        "colour": ([s.objects[0].color for s in scenes], list(COLOR_NAMES)),
    }
    chunks = range(0, len(images), 100)
    vision_tokens = [model.backbone.vision_tokens(images[i : i + 100]) for i in chunks]  # each (100, N, H)
    features = {"backbone vision tokens": torch.cat([pooled(t) for t in vision_tokens])}
    if model.config.target == "clip" and model.clip.feature_normalization_fitted:
        features["CLIP target tokens"] = torch.cat(
            [pooled(model.encode_image(images[i : i + 100])) for i in chunks]
        )
    n_train = len(images) * 5 // 6
    print(f"{args.model}: {len(images)} single-object scenes, probes fitted on {n_train}, scored on the rest")
    for name, x in features.items():
        scores = ", ".join(
            f"{what} {ridge_accuracy(x.numpy(), y, classes, n_train):.3f} (chance {1 / len(classes):.3f})"
            for what, (y, classes) in labels.items()
        )
        print(f"  {name:24s} {scores}")

    per_token = torch.cat(vision_tokens[:6])  # (M, N, H): the first 600 images' tokens, unpooled
    m, n, _ = per_token.shape
    grid = math.isqrt(n)
    cell = np.tile(np.arange(n), m)  # raster index of each token's cell
    x = per_token.reshape(m * n, -1).numpy()
    classes = [str(i) for i in range(grid)]
    rows, cols = [str(i // grid) for i in cell], [str(i % grid) for i in cell]
    n_tokens = m * 5 // 6 * n  # fitted on the tokens of 5/6 of the images
    print(
        f"  {'each vision token, own cell':24s} row {ridge_accuracy(x, rows, classes, n_tokens):.3f}, "
        f"column {ridge_accuracy(x, cols, classes, n_tokens):.3f} (chance {1 / grid:.3f}; {m} images)"
    )


if __name__ == "__main__":
    main()
