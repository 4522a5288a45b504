"""Where does generation lose the scene? Real target -> noised to sigma s -> the DiT's sampler from s -> judge.

    .venv/bin/python bench/denoise_from_sigma.py runs/shapes/final [--sigmas 0,0.3,0.5,0.7,0.9,1]
        [--prompts 60] [--plot out.png] [--grids DIR]

For a category-balanced subset of ShapesGenEval prompts it renders one scene that satisfies each prompt,
encodes it into the DiT's target space, mixes in noise up to level s (x_s = (1 - s) x0 + s noise, the
training path) and lets the model's own guided Euler sampler finish the trajectory from s, conditioned on the
prompt; then the pixel decoder draws it and the judge scores it as a generated image. s = 0 is the target
round trip (the ceiling), s = 1 is plain generation. The level where the score falls tells which part of
the trajectory the DiT has not learned: a fall at high s only means it cannot lay out a scene, a fall at
low s that it cannot draw the objects it is given. The sampler is `sample_euler(..., start_sigma=s)`: the
same sigma grid as a full run, entered at s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip3o.eval.geneval import score_detections
from blip3o.eval.prompt_targets import add_probe_arguments, load_probe
from blip3o.models.blip3o import Blip3o
from blip3o.transport.flow_matching import interpolate, sample_euler
from blip3o.world.judge import detect


@torch.no_grad()
def sample_from(
    model: Blip3o, x0: torch.Tensor, condition: torch.Tensor, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Noise x0 (B, C, h, w) to `sigma`, then run the model's guided Euler sampler from there to 0."""
    noise = torch.randn(x0.shape, generator=generator)  # (B, C, h, w)
    x_sigma = interpolate(x0, noise, torch.tensor(sigma))  # (B, C, h, w)
    return sample_euler(model.dit, x_sigma, condition, model.config.flow, start_sigma=sigma)


def save_plot(sigmas: list[float], scores: list[float], errors: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(sigmas, scores, "o-")
    left.set(xlabel="sampling starts at noise level s", ylabel="ShapesGenEval (subset)", ylim=(-0.02, 1.02))
    left.grid(alpha=0.3)
    right.plot(sigmas, errors, "o-", color="tab:red")
    right.set(xlabel="sampling starts at noise level s", ylabel="MSE of the sample to the real target")
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, "0,0.3,0.5,0.6,0.7,0.8,0.9,1", 60, "scene, noise and decoder seed")
    parser.add_argument("--plot", help="write the score and error against s to this PNG")
    parser.add_argument("--grids", help="write each level's first 48 images as DIR/sigma_S.png")
    args = parser.parse_args(argv)
    sigmas, model, (records, x0, condition) = load_probe(parser, args)  # x0 (B, C, h, w), cond (B, Q, H)

    print(
        f"{len(records)} prompts, cfg {model.config.flow.cfg_scale}, {model.config.flow.sample_steps} steps"
    )
    print("| start s | ShapesGenEval | MSE to real target |\n|---|---|---|")
    scores, errors = [], []
    for sigma in sigmas:
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            x = x0.clone() if sigma == 0 else sample_from(model, x0, condition, sigma, generator)
            images = model.decode_target(x, generator=generator)
        passed = [score_detections(r, detect(image))[0] for r, image in zip(records, images, strict=True)]
        scores.append(float(np.mean(passed)))
        errors.append(float(((x - x0) ** 2).mean()))
        print(f"| {sigma:.2f} | {scores[-1]:.3f} | {errors[-1]:.3f} |", flush=True)
        if args.grids:
            folder = Path(args.grids)
            folder.mkdir(parents=True, exist_ok=True)
            grid = Image.new("RGB", (64 * 12, 64 * 4), "white")
            for i, image in enumerate(images[:48]):
                grid.paste(image.resize((64, 64)), (64 * (i % 12), 64 * (i // 12)))
            grid.save(folder / f"sigma_{sigma:.2f}.png")
    if args.plot:
        save_plot(
            sigmas, scores, errors, Path(args.plot), f"{args.model}: real target noised to s, then sampled"
        )
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
