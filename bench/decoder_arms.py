"""Which pixel decoder draws a model's generated tokens best? One set of DiT samples, several decoders, one judge.

    .venv/bin/python bench/decoder_arms.py MODEL [--dec DIR ...] [--prompts 240] [--cfg 3] [--seed 0] [--grid PNG]

The model's DiT samples CLIP targets once for balanced ShapesGenEval prompts (`balanced_subset`, seed --seed);
each decoder then draws the same targets (same decoder seed) and the ShapesWorld judge scores the images by
ShapesGenEval's rules. So the rows differ only in the decoder: a paired comparison, far steadier than two
full `blip3o eval geneval` runs, and ~1-2 min per arm instead of ~16 min per seed. The first row is MODEL's own
decoder. A --dec folder is a model folder (its decoder/ is used) or a decoder folder itself; the decoders must
read MODEL's CLIP features (same feature width and token count).

"found" is the share of images in which the judge found any object at all: with the object-centric target it
separated decoders better than the score did (docs/bench/object_target.txt, session 18).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from blip3o.eval.geneval import detection_verdicts, score_detection_lists
from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.models.decoder import PixelDecoder
from blip3o.viz import image_grid
from blip3o.world.judge import detect
from blip3o.world.prompts import load_eval_prompts


def load_decoder(folder: Path) -> PixelDecoder:
    """A decoder from a model folder (its decoder/) or from a decoder folder, in float32."""
    folder = folder / "decoder" if (folder / "decoder" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder}: neither a model folder nor a decoder folder (no config.json)")
    return PixelDecoder.from_pretrained(folder).float().eval()


@torch.no_grad()
def judge_decoder(
    model: Blip3o, decoder: PixelDecoder, targets: torch.Tensor, records: list[dict], args
) -> tuple[dict, list[Image.Image], list[bool]]:
    """Draw (P, C, g, g) DiT targets with `decoder` in `model`'s place, in batches, and score the images.
    Returns the score, the images and each image's verdict."""
    model.decoder = decoder
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    for start in range(0, len(targets), args.batch):
        chunk = targets[start : start + args.batch]  # (b, C, g, g)
        images += model.decode_target(chunk, args.decoder_steps, args.decoder_cfg, generator)
    detections = [detect(image) for image in images]
    verdicts = detection_verdicts(records, detections)
    return score_detection_lists(records, detections, verdicts), images, verdicts


def comparison_grid(
    records: list[dict], drawn: dict[str, tuple[list[Image.Image], list[bool]]], per_category: int
) -> Image.Image:
    """The first `per_category` prompts of each category, one row per decoder, each image with its verdict."""
    picked: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if len(picked.setdefault(record["tag"], [])) < per_category:
            picked[record["tag"]].append(i)
    columns = [i for rows in picked.values() for i in rows]
    images, labels, colors = [], [], []
    for arm, (arm_images, verdicts) in enumerate(drawn.values()):
        for i in columns:
            images.append(arm_images[i])
            verdict = "PASS" if verdicts[i] else "FAIL"
            labels.append(
                f"{verdict} {records[i]['prompt'].removeprefix('a photo of ')}" if arm == 0 else verdict
            )
            colors.append("darkgreen" if verdicts[i] else "darkred")
    title = "rows: " + " | ".join(f"{k + 1}. {name}" for k, name in enumerate(drawn))
    return image_grid(
        images, labels, columns=len(columns), cell=96, title=title, label_lines=3, colors=colors
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the model whose DiT samples the targets")
    parser.add_argument(
        "--dec", type=Path, nargs="*", default=[], help="other decoders (model or decoder folders)"
    )
    parser.add_argument("--prompts", type=int, default=240, help="balanced ShapesGenEval prompts")
    parser.add_argument("--cfg", type=float, default=3.0, help="the DiT's guidance scale")
    parser.add_argument("--steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument("--decoder-steps", type=int, help="decoder sampling steps (default: each decoder's)")
    parser.add_argument("--decoder-cfg", type=float, help="decoder guidance (default: each decoder's)")
    parser.add_argument("--seed", type=int, default=0, help="prompt subset, DiT and decoder seed")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path, help="also write a PNG: the same prompts drawn by every decoder")
    parser.add_argument("--grid-per-category", type=int, default=2, help="prompts per category in --grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    if model.config.target != "clip":
        parser.error(f"{args.model}: its DiT generates {model.config.target} latents, not CLIP targets")
    records = [r for _, r in balanced_subset(load_eval_prompts(), args.prompts)]
    prompts = [r["prompt"] for r in records]
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        chunks = [
            model.generate_target(prompts[start : start + args.batch], args.steps, args.cfg, generator)
            for start in range(0, len(prompts), args.batch)
        ]  # each (b, C, g, g)
    targets = torch.cat(chunks)  # (P, C, g, g)
    wanted = (model.decoder.config.num_feature_tokens, model.decoder.config.feature_dim)
    arms = {f"{args.model} (own)": model.decoder}
    for folder in args.dec:
        decoder = load_decoder(folder)
        reads = (decoder.config.num_feature_tokens, decoder.config.feature_dim)
        if reads != wanted:
            parser.error(f"{folder}: its decoder reads {reads[0]} x {reads[1]} features, the model makes "
                         f"{wanted[0]} x {wanted[1]}")  # fmt: skip
        arms[str(folder)] = decoder
    result = {
        "model": str(args.model),
        "prompts": len(records),
        "cfg": args.cfg,
        "seed": args.seed,
        "arms": {},
    }
    print(f"{len(records)} balanced prompts, DiT CFG {args.cfg:g}, seed {args.seed}")
    drawn = {}
    for name, decoder in arms.items():
        row, images, verdicts = judge_decoder(model, decoder, targets, records, args)
        result["arms"][name] = row
        drawn[name] = (images, verdicts)
        categories = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("found", "overall"))
        print(f"  overall {row['overall']:.3f}, found {row['found']:.3f}: {categories}  <- {name}")
    if args.grid:
        comparison_grid(records, drawn, args.grid_per_category).save(args.grid)
        print(f"grid: {args.grid}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
