"""Pixel-decoder reconstruction with the judge: decode held-out ShapesWorld images from their own CLIP features.

    .venv/bin/python bench/decoder_reconstruction.py --model runs/quick1/final
    .venv/bin/python bench/decoder_reconstruction.py --clip runs/x/clip --decoder runs/y/decoder \
        --steps 10 20 --cfg 1 3 --n 200
    .venv/bin/python bench/decoder_reconstruction.py --model runs/y/decoder/model \
        --checkpoint runs/y/decoder/checkpoints/step_00000100/model.safetensors

For `--n` scenes sampled from a held-out world seed (not the training shards' seed 0), each image is encoded
by the frozen CLIP (normalised target tokens, what the DiT generates) and decoded by the pixel decoder. A
reconstruction agrees with its scene when the judge's detections (confidence >= 0.5) have exactly the
scene graph's multiset of (shape, colour); "count" is the looser share with the right number of objects,
"colours" the share with the right multiset of colours, and "psnr_db" the pixel PSNR of the reconstructions
(a continuous proxy that still ranks decoders while the judge's agreement is 0). Also printed: the wall time of decoding 16 images
(one decode call, batch 16) for every (steps, cfg) setting, and the judge on the originals as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from blip3o.models.clip import ClipEncoder
from blip3o.models.decoder import PixelDecoder, images_to_tensor, tensor_to_images
from blip3o.viz import image_grid
from blip3o.world.judge import detect
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene

HELD_OUT_SEED = 7_000_001


def load(args: argparse.Namespace) -> tuple[ClipEncoder, PixelDecoder]:
    if args.model:
        clip_dir, decoder_dir = Path(args.model) / "clip", Path(args.model) / "decoder"
    else:
        clip_dir, decoder_dir = Path(args.clip), Path(args.decoder)
    clip, decoder = ClipEncoder.from_pretrained(clip_dir), PixelDecoder.from_pretrained(decoder_dir)
    if args.checkpoint:  # a training checkpoint's trainable weights (keys "model.decoder.*")
        state = load_file(args.checkpoint)
        prefix = "model.decoder."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise SystemExit(f"{args.checkpoint} holds no decoder weights")
        decoder.load_state_dict(sub, strict=True)
        clip_state = {
            k[len("model.clip.") :]: v for k, v in state.items() if k.startswith("model.clip.feature_")
        }
        for name, value in clip_state.items():  # normalisation fitted by the decoder stage
            getattr(clip, name).copy_(value)
    if not clip.feature_normalization_fitted:
        raise SystemExit("CLIP feature normalisation is not fitted in this model")
    return clip.eval(), decoder.eval()


def score(images, scenes) -> dict[str, float]:
    exact = count = colours = 0
    for image, scene in zip(images, scenes, strict=True):
        found = detect(image)
        truth = [(o.shape, o.color) for o in scene.objects]
        exact += Counter((d.shape, d.color) for d in found) == Counter(truth)
        count += len(found) == len(truth)
        colours += Counter(d.color for d in found) == Counter(c for _, c in truth)
    n = len(scenes)
    return {"agreement": exact / n, "count": count / n, "colours": colours / n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Blip3o model folder (uses its clip/ and decoder/)")
    parser.add_argument("--clip", help="ClipEncoder folder (with --decoder)")
    parser.add_argument("--decoder", help="PixelDecoder folder (with --clip)")
    parser.add_argument("--checkpoint", help="training checkpoint model.safetensors to load into the decoder")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="world seed of the held-out scenes")
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--cfg", type=float, nargs="+", default=[3.0])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--grid", help="write a PNG grid: 16 originals above their reconstructions (first setting)"
    )
    parser.add_argument("--json", help="append one JSON line per setting to this file")
    args = parser.parse_args(argv)
    if not args.model and not (args.clip and args.decoder):
        parser.error("give --model, or --clip and --decoder")
    torch.set_num_threads(args.threads)

    clip, decoder = load(args)
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.n)]
    originals = [render(s) for s in scenes]
    with torch.no_grad():
        features = torch.cat(
            [clip.encode_image(clip.preprocess(originals[i : i + 256])) for i in range(0, args.n, 256)]
        )  # (n, N, D)
    targets = images_to_tensor(originals)  # (n, 3, H, W) in [-1, 1]
    print(f"judge on the originals: {score(originals, scenes)}")
    params = sum(p.numel() for p in decoder.parameters())
    print(f"decoder: {params:,} params, config {json.dumps(decoder.config.__dict__)}")
    for steps in args.steps:
        for cfg in args.cfg:
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            decoder.decode(
                features[:16], steps=steps, cfg_scale=cfg, generator=torch.Generator().manual_seed(1)
            )
            time16 = time.perf_counter() - start
            images, squared = [], 0.0
            for i in range(0, args.n, args.batch):
                pixels = decoder.decode(
                    features[i : i + args.batch], steps=steps, cfg_scale=cfg, generator=generator
                )
                squared += ((pixels - targets[i : i + args.batch]) ** 2).mean(dim=(1, 2, 3)).sum().item()
                images += tensor_to_images(pixels)
            psnr = 10 * np.log10(4 / (squared / args.n))  # [-1, 1] pixels: peak-to-peak 2
            result = {"steps": steps, "cfg": cfg, **score(images, scenes), "psnr_db": round(float(psnr), 2)}
            result["decode16_s"] = round(time16, 2)
            result["n"] = args.n
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(
                        json.dumps({"source": args.checkpoint or args.model or args.decoder, **result}) + "\n"
                    )
            if args.grid and steps == args.steps[0] and cfg == args.cfg[0]:
                image_grid(originals[:16] + images[:16], columns=16, cell=64).save(args.grid)


if __name__ == "__main__":
    main()
