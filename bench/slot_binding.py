"""Does the DiT's cross-attention at an object's token read that object's slot? (models with a resampler)

    .venv/bin/python bench/slot_binding.py MODEL [--prompts 300] [--sigmas 0.1 0.3 0.5 0.7 0.9]

Two-object training prompts whose scenes hold exactly the two named objects, half naming no colour ("a photo of
a circle left of a star") and half naming colours. Each is noised to the given levels (teacher forcing: the
object already sits in its token, the more so the lower the level) and run through the DiT once. At the token
holding the caption's k-th object (`caption_slot_cells`, where the object-centric target writes it), the
head-mean cross-attention weight on slot k is compared with the weight on the other object's slot: the "own
share" own / (own + other), 0.5 when the token cannot tell its object's slot from the other's. Printed per
level and layer, for the colourless and the coloured half, with the share of tokens above 0.5. This is what
`StageConfig.slot_binding_weight` trains (docs/bench/object_target.txt, session 32).
"""

from __future__ import annotations

import argparse

import torch

from blip3o.models.blip3o import Blip3o
from blip3o.train.data import instruct_examples
from blip3o.train.slot_supervision import UNNAMED, caption_slot_cells
from blip3o.world.language import caption_objects


def two_object_examples(count: int) -> tuple[list, torch.Tensor]:
    """count / 2 colourless and count / 2 coloured two-object training examples, and which are colourless."""
    pairs = [
        e
        for e in instruct_examples(0, 1)
        if len(e.scene.objects) == 2 and len(caption_objects(e.short_caption)) == 2
    ]
    named = [any(c is not None for _, c in caption_objects(e.short_caption)) for e in pairs]
    bare = [e for e, n in zip(pairs, named, strict=True) if not n][: count // 2]
    coloured = [e for e, n in zip(pairs, named, strict=True) if n][: count // 2]
    return bare + coloured, torch.tensor([True] * len(bare) + [False] * len(coloured))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args()

    model = Blip3o.from_pretrained(args.model).float().eval()
    if model.dit.resampler is None:
        raise SystemExit("this model's DiT has no condition resampler: no slots to bind")
    examples, bare = two_object_examples(args.prompts)
    grid, slots = model.config.dit.grid_size, model.config.dit.condition_slots
    cells = [caption_slot_cells(e.short_caption, slots, e.scene, grid) for e in examples]
    cells = torch.stack(cells)  # (B, S): each slot's object token
    matched = (cells[:, :2] != UNNAMED).all(dim=1)  # (B,)
    print(
        f"{len(examples)} prompts ({int(bare.sum())} colourless), both objects matched: {int(matched.sum())}"
    )
    rows = torch.arange(len(examples))
    with torch.no_grad():
        x0 = model.encode_target([e.image for e in examples])  # (B, C, h, w)
        condition = model.condition([e.short_caption for e in examples]).float()  # (B, L, H)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        print("sigma layer  own share: colourless  coloured   tokens above 0.5: colourless  coloured")
        for sigma in args.sigmas:
            maps: list[torch.Tensor] = []
            timestep = torch.full((len(examples),), 1000.0 * sigma)
            model.dit((1 - sigma) * x0 + sigma * noise, timestep, condition, maps)
            for layer, weights in enumerate(maps):
                mean = weights.mean(dim=1)  # (B, N, S) over heads
                shares = []
                for own, other in ((0, 1), (1, 0)):
                    at = mean[rows, cells[:, own].clamp(min=0)]  # (B, S) at the own object's token
                    shares.append(at[:, own] / (at[:, own] + at[:, other]))  # (B,)
                share = torch.stack(shares, dim=1)[matched]  # (b, 2)
                kind = bare[matched]
                print(
                    f"{sigma:5.2f} {layer:5d}  {share[kind].mean():21.3f} {share[~kind].mean():9.3f}"
                    f" {(share[kind] > 0.5).float().mean():29.3f} {(share[~kind] > 0.5).float().mean():9.3f}"
                )


if __name__ == "__main__":
    main()
