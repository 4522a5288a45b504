"""Does the DiT use the prompt? Its flow-matching loss with the real, the zero and another prompt's condition.

    .venv/bin/python bench/condition_gap.py runs/shapes/final [--sigmas 1,0.9,0.8,0.7,0.5,0.3]
        [--prompts 120] [--draws 4] [--plot out.png]

For a category-balanced subset of ShapesGenEval prompts it renders one scene that satisfies each prompt and
encodes it into the DiT's target space (x0), then, at fixed noise levels s, measures the training loss
E |v(x_s, s, c) - (noise - x0)|^2 with three conditions c: the prompt's own, the zero condition (what
classifier-free guidance uses as "no prompt") and the next prompt's (shuffled). At high s the noisy input
says almost nothing about the scene, so the layout can only come from the condition: a DiT that has learned
to read its prompt has a clearly lower loss with the real condition there. A gap near 0 means the samples
cannot follow the prompt whatever the sampler does.

Reading it: at s = 1 the loss is the error of the DiT's guess of x0 from the prompt alone (the targets are
normalised to unit variance per channel, so guessing x0 = 0, i.e. v = noise, scores about 1). Same prompts, scenes
and noise for every condition, so the differences are paired.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from blip3o.eval.prompt_targets import add_probe_arguments, load_probe
from blip3o.models.blip3o import Blip3o
from blip3o.transport.flow_matching import interpolate, velocity_target

CONDITIONS = ("real", "zero", "shuffled")


@torch.no_grad()
def condition_losses(
    model: Blip3o, x0: torch.Tensor, condition: torch.Tensor, sigma: float, noise: torch.Tensor
) -> dict[str, float]:
    """Mean velocity MSE at noise level `sigma` under each of CONDITIONS. x0 and noise (B, C, h, w)."""
    sigmas = torch.full((x0.shape[0],), sigma)  # (B,)
    x_s = interpolate(x0, noise, sigmas)  # (B, C, h, w)
    target = velocity_target(x0, noise)  # (B, C, h, w)
    timestep = sigmas * model.config.flow.timestep_scale  # (B,)
    variants = {
        "real": condition,
        "zero": torch.zeros_like(condition),
        "shuffled": torch.roll(condition, 1, dims=0),  # each sample gets the next prompt's condition
    }
    return {name: float(((model.dit(x_s, timestep, c) - target) ** 2).mean()) for name, c in variants.items()}


def save_plot(sigmas: list[float], rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in CONDITIONS:
        ax.plot(sigmas, [r[name] for r in rows], "o-", label=f"{name} condition")
    ax.set(xlabel="noise level s", ylabel="flow-matching loss (velocity MSE)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, "1,0.9,0.8,0.7,0.5,0.3", 120, "scene and noise seed")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per prompt and level")
    parser.add_argument("--plot", help="write the three losses against s to this PNG")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.prompts < 2:
        parser.error("need --draws >= 1 and --prompts >= 2 (the shuffled condition needs another prompt)")
    sigmas, model, (records, x0, condition) = load_probe(parser, args)  # x0 (B, C, h, w), cond (B, Q, H)

    print(f"{args.model}: {len(records)} prompts x {args.draws} noise draws per level")
    print("| s | real | zero | shuffled | zero - real | shuffled - real |\n|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for sigma in sigmas:
        draws = [
            condition_losses(model, x0, condition, sigma, torch.randn(x0.shape, generator=generator))
            for _ in range(args.draws)
        ]
        row = {name: float(np.mean([d[name] for d in draws])) for name in CONDITIONS}
        rows.append(row)
        print(
            f"| {sigma:.2f} | {row['real']:.4f} | {row['zero']:.4f} | {row['shuffled']:.4f} "
            f"| {row['zero'] - row['real']:+.4f} | {row['shuffled'] - row['real']:+.4f} |",
            flush=True,
        )
    if args.plot:
        save_plot(sigmas, rows, Path(args.plot), f"{args.model}: does the DiT use its prompt?")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
