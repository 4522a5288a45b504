"""Does the DiT draw objects, or denoise each token on its own? How much its x0 guess at a token reads other tokens.

    .venv/bin/python bench/dit_locality.py runs/shapes/final [--sigmas 0.9,0.7,0.5,0.3] [--prompts 60]

An object in a ShapesWorld image covers 2x2 to 3x3 of the 8x8 CLIP target tokens, and its shape only exists
across them: a token alone says little about which shape it is a piece of (a linear probe on single tokens
names the object's shape 0.36 of the time, chance 0.20). So a DiT that draws clean shapes must make each
token's guess agree with its neighbours'. This probe measures how much it does.

For real targets x0 of category-balanced GenEval prompts, noised to level s, with the prompts' own condition,
it takes the DiT's guess of the clean target at grid token i, x0_hat_i = x_s,i - s v_i (after the patch
unfolding, one CLIP token), and splits the squared Frobenius norm of its Jacobian with respect to the input
tokens, sum_j |d x0_hat_i / d x_s,j|^2, into three shares: token i itself, its 8 neighbours, and the rest. The
norms are estimated with random projections (E |J^T r|^2 = |J|_F^2 for r ~ N(0, I)), over every sample and a
fixed set of interior tokens.

A second table shows where each self-attention head of the DiT looks: the mean weight an interior query
token puts on itself and on its 8 neighbours, against uniform attention.

Reading it: a share of "self" near 1 at mid noise (s = 0.5 to 0.8, where shapes form) means each token is
denoised on its own, and samples come out as ragged fragments even when the layout is right.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from blip3o.eval.locality import linear_denoiser_shares, locality_shares, self_attention_shares
from blip3o.eval.prompt_targets import add_probe_arguments, load_probe
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, "0.9,0.8,0.7,0.5,0.3", 24, "scene and noise seed")
    parser.add_argument("--projections", type=int, default=2, help="random projections per token")
    parser.add_argument("--attention-sigma", type=float, default=0.7, help="level for the attention table")
    parser.add_argument(
        "--reference",
        type=int,
        default=2000,
        help="random scenes for the linear-denoiser reference (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.projections < 1 or args.prompts < 1 or args.reference < 0:
        parser.error("need --projections >= 1, --prompts >= 1 and --reference >= 0")
    sigmas, model, (records, x0, condition) = load_probe(parser, args)  # x0 (B, C, h, w), cond (B, Q, H)

    reference = {}
    if args.reference:
        rng = np.random.default_rng(args.seed + 1)
        scenes = [render(sample_scene(rng)) for _ in range(args.reference)]
        with torch.no_grad():
            targets = torch.cat(
                [model.encode_target(scenes[k : k + 256]) for k in range(0, len(scenes), 256)]
            )
        reference = linear_denoiser_shares(targets, sigmas)  # (N, C, h, w) -> shares per level

    print(f"{args.model}: {len(records)} prompts, {args.projections} projections per interior token")
    if reference:
        print(f"reference: the best linear denoiser fitted on {args.reference} random scenes' targets")
    print(
        "| s | self | 8 neighbours | rest | linear reference: self / neighbours / rest |\n|---|---|---|---|---|"
    )
    generator = torch.Generator().manual_seed(args.seed)
    scale = model.config.flow.timestep_scale
    for sigma in sigmas:
        shares = locality_shares(model.dit, x0, condition, sigma, generator, args.projections, scale)
        ref = reference.get(sigma)
        ref_text = f"{ref['self']:.3f} / {ref['neighbours']:.3f} / {ref['rest']:.3f}" if ref else "-"
        print(
            f"| {sigma:.2f} | {shares['self']:.3f} | {shares['neighbours']:.3f} | {shares['rest']:.3f} | {ref_text} |",
            flush=True,
        )

    attention = self_attention_shares(model.dit, x0, condition, args.attention_sigma, generator, scale)
    cells = x0.shape[2] * x0.shape[3] // model.config.dit.patch_size**2
    print(
        f"\nself-attention at s = {args.attention_sigma}: mean weight an interior token puts on itself / on its "
        f"8 neighbours, per head (uniform: {1 / cells:.3f} / {8 / cells:.3f})"
    )
    for index, layer in enumerate(attention):  # (H, 2)
        print(f"layer {index}: " + "  ".join(f"{own:.2f}/{near:.2f}" for own, near in layer.tolist()))


if __name__ == "__main__":
    main()
