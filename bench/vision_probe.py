"""Does a model's vision encode what ShapesVQA asks? Linear probes on single-object ShapesWorld scenes.

    .venv/bin/python bench/vision_probe.py runs/shapes/final [--images 3000]

Two representations are probed: the backbone's merged vision tokens (what the language model reads) and the
CLIP target tokens (what the DiT generates). Each image's tokens are pooled to mean, max and min over tokens
(a translation-invariant summary, since the object can be anywhere), then a linear classifier is fitted on
5/6 of the images and scored on the rest, for the object's shape and for its colour. The figures are held-out
accuracies against chance; a vision tower whose shape probe is near chance cannot support shape questions,
whatever the language model learns.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from blip3o.models.blip3o import Blip3o
from blip3o.world.render import render
from blip3o.world.sampler import ObjectSpec, sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, 3D): mean, max and min over the tokens."""
    return torch.cat([tokens.mean(1), tokens.amax(1), tokens.amin(1)], dim=1)


@torch.no_grad()
def backbone_tokens(model: Blip3o, images: list) -> torch.Tensor:
    """The backbone's merged vision tokens, (B, N, H), as the language model receives them."""
    processor = model.backbone.processor
    enc = processor.image_processor(images=images, return_tensors="pt")
    out = model.backbone.vlm.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
    merged = out.pooler_output  # (B * N, H)
    return merged.reshape(len(images), -1, merged.shape[-1])


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier (full-batch Adam) on standardised features."""
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(x[:n_train]), y[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (head(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng, [ObjectSpec()]) for _ in range(args.images)]
    images = [render(s) for s in scenes]
    labels = {
        "shape": torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes]),
        "colour": torch.tensor([COLOR_NAMES.index(s.objects[0].color) for s in scenes]),
    }
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOR_NAMES)}
    chunks = range(0, len(images), 100)
    features = {
        "backbone vision tokens": torch.cat(
            [pooled(backbone_tokens(model, images[i : i + 100])) for i in chunks]
        )
    }
    if model.config.target == "clip" and model.clip.feature_normalization_fitted:
        features["CLIP target tokens"] = torch.cat(
            [pooled(model.encode_image(images[i : i + 100])) for i in chunks]
        )
    n_train = len(images) * 5 // 6
    print(f"{args.model}: {len(images)} single-object scenes, probes fitted on {n_train}, scored on the rest")
    for name, x in features.items():
        scores = ", ".join(
            f"{what} {probe(x, y, n_train):.3f} (chance {chance[what]:.3f})" for what, y in labels.items()
        )
        print(f"  {name:24s} {scores}")


if __name__ == "__main__":
    main()
