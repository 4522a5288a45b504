"""Can the generation target be turned back into judged-correct images? Real renders -> target -> pixels -> judge.

    .venv/bin/python bench/target_roundtrip.py runs/shapes/final [--prompts 80] [--grid out.png]
    .venv/bin/python bench/target_roundtrip.py MODEL --components 8 16 24 32   # what k would keep


Renders one clean scene for each of N ShapesGenEval prompts (every 7th prompt, all categories), encodes it into
the DiT's target space and decodes it back, then scores the result with the ShapesWorld judge exactly as a
generated image would be scored. Two decoders are measured for a CLIP target: the model's diffusion decoder
and, when CLIP has one, its linear per-patch pixel head (no diffusion, so it shows what the features alone
carry; it reads unpooled patch tokens, so it is skipped for a pooled target). The figure is an upper bound on ShapesGenEval for a DiT that generated perfect targets: a target
variant (width, pooling, VAE) that scores low here cannot score well when generated.

`--components K ...` adds one row per K: the CLIP features cut to their top-K principal components
(`ClipConfig.target_components`, fitted here on 1,024 fresh renders) and mapped back before the decoder, i.e. the
bound for a DiT that generated K components instead.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from blip3o.eval.geneval import score_detections
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens
from blip3o.models.decoder import tensor_to_images
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.judge import detect
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


@torch.no_grad()
def pixel_head_images(model: Blip3o, target: torch.Tensor) -> list[Image.Image]:
    """(B, C, g, g) CLIP target -> images through CLIP's linear pixel head."""
    clip = model.clip
    features = clip.target_to_features(grid_to_tokens(target))  # (B, N, D), normalised
    pixels = clip.pixels_from_patch_tokens(clip.denormalize_features(features))  # (B, 3, S, S)
    unit = clip.denormalize_pixels(pixels).clamp(0, 1)  # (B, 3, S, S) in [0, 1]
    return tensor_to_images(unit * 2 - 1)  # tensor_to_images reads [-1, 1]


@torch.no_grad()
def component_round_trips(
    model: Blip3o, renders: list[Image.Image], ks: list[int], steps: int | None, seed: int
) -> dict[int, list[Image.Image]]:
    """Per k: renders -> CLIP features cut to their top-k principal components (fitted on 1,024 fresh
    renders) -> the model's decoder -> images."""
    clip = model.clip
    fit_images = [render(sample_scene(np.random.default_rng(10_000 + i))) for i in range(1024)]
    raw_fit = torch.cat(
        [clip.encode_image_raw(clip.preprocess(fit_images[i : i + 256])) for i in range(0, 1024, 256)]
    )  # (1024, N, D)
    raw = clip.encode_image_raw(clip.preprocess(renders))  # (B, N, D)
    images = {}
    for k in ks:
        cut = clip.with_target_components(k, raw_fit)  # shares the towers
        target = cut.features_to_target(cut.normalize_features(raw))  # (B, N, k)
        kept = cut.denormalize_features(cut.target_to_features(target))  # (B, N, D), raw scale
        generator = torch.Generator().manual_seed(seed)
        pixels = model.decoder.decode(clip.normalize_features(kept), steps=steps, generator=generator)
        images[k] = tensor_to_images(pixels)  # decoded in the model's own feature space
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0, help="decoder sampling seed")
    parser.add_argument(
        "--decoder-steps", type=int, help="the decoder's sampling steps (default: the model's)"
    )
    parser.add_argument("--grid", help="write the first 16 renders and their round trips to this PNG")
    parser.add_argument(
        "--components",
        type=int,
        nargs="*",
        default=[],
        help="also measure CLIP cut to these top-K components",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    records = load_eval_prompts()[::7][: args.prompts]
    renders = [
        render(scene_for_prompt(r, np.random.default_rng(i), distractors=0)) for i, r in enumerate(records)
    ]
    with torch.no_grad():
        target = model.encode_target(renders)  # (B, C, h, w)
        generator = torch.Generator().manual_seed(args.seed)
        rows = {"decoder": model.decode_target(target, decoder_steps=args.decoder_steps, generator=generator)}
        clip_config = model.config.clip
        if (
            model.config.target == "clip"
            and model.clip.pixel_head is not None
            and clip_config.target_pool == 1
        ):
            rows["pixel head"] = pixel_head_images(model, target)
        cut = component_round_trips(model, renders, args.components, args.decoder_steps, args.seed)
        rows.update({f"decoder, top {k} components": images for k, images in cut.items()})
    print(f"{args.model}: {model.config.target} target {tuple(target.shape[1:])}, {len(records)} prompts")
    rows = {"renders themselves": renders, **{f"through the {k}": v for k, v in rows.items()}}
    width = max(len(name) for name in rows)
    for name, images in rows.items():
        correct = sum(score_detections(r, detect(im))[0] for r, im in zip(records, images, strict=True))
        print(f"  {name:{width}s} {correct:3d}/{len(records)} judged correct")
    if args.grid:
        cols = min(16, len(renders))
        grid = Image.new("RGB", (cols * 66, len(rows) * 66), "white")
        for j in range(cols):
            for i, images in enumerate(rows.values()):
                grid.paste(images[j], (j * 66, i * 66))
        grid.save(args.grid)
        print(f"  grid, one row each ({', '.join(rows)}): {args.grid}")


if __name__ == "__main__":
    main()
