"""Can the DiT generate the backbone's own merged vision tokens? A shape-readable target, judged per token.

    .venv/bin/python bench/vision_target.py MODEL [--components 16] [--instruct 6] [--steps 4000]
        [--eval-every 1000] [--decoder-steps 1200] [--decoder-sampling 10:1 50:3] [--device cuda] [--out DIR]

Why: a single CLIP target token hardly says which shape it belongs to (a linear probe: 0.36, chance 0.20), and
the DiT finishes each token on its own (bench/dit_locality.py), so it draws fragments. The backbone's merged
vision tokens, taught shape and colour per 16-px cell in the vision stage (train/scene_supervision.py), say it
outright (bench/vision_probe.py: 0.94). This bench asks whether the DiT can generate *those* from the model's
real condition, judged without any pixel decoder:

1. N fresh renders (world seed 0), plus R renders of a scene built for each GenEval-style training prompt
   (stage 3's data; `--instruct R`), go through the model's vision tower: (N, 16, H) tokens, normalised per
   channel and cut to their top K principal components, whitened (as ClipConfig.target_components does).
2. Linear read-outs (least squares on one-hot labels) of each cell's shape-or-none and colour-or-none
   (`scene_cell_labels`) are fitted on the first 3/4 of the N scenes; their held-out accuracy is printed.
3. The token judge reads a token grid into judge detections (one per cell read as an object, its box the
   cell) and scores them against the prompt with the project's ShapesGenEval rules. On the real tokens of
   scenes built for the evaluation prompts it gives the read-outs' ceiling.
4. A fresh DiT (the model's DiT config on the 4x4 grid, K channels) learns the tokens by flow matching from
   the model's frozen condition (backbone + queries) on each caption (10% short) or training prompt. Every
   `--eval-every` steps it samples the evaluation prompts and the token judge scores them, per category.
5. Optionally (`--decoder-steps`), a pixel decoder (`tiny_spatial` layout, reading the K-channel tokens)
   learns to draw the renders from their tokens. The real pixel judge then scores the round trip (real
   tokens of the evaluation scenes) and the end to end (the DiT's tokens), for each decoder sampler setting
   in `--decoder-sampling` (Euler steps : CFG scale; default 10:1, the recipe's).

Figures on the bundled model: README, "Where it fails".
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blip3o.eval.geneval import score_detections
from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens, tokens_to_grid
from blip3o.models.decoder import PixelDecoder, decoder_config, images_to_tensor, tensor_to_images
from blip3o.models.dit import DiT
from blip3o.train.scene_supervision import NO_OBJECT_COLOR, NO_OBJECT_SHAPE, scene_cell_labels
from blip3o.viz import image_grid
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.judge import Detection
from blip3o.world.language import annotate
from blip3o.world.prompts import load_eval_prompts, load_train_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES
from oracle_condition import (  # bench/ is on sys.path when run
    decoder_training,
    dit_training,
    judge_images,
    model_conditions,
)


class TokenBasis:
    """Per-channel normalisation and the top-K principal components, whitened, of (N, T, H) tokens."""

    def __init__(self, tokens: torch.Tensor, components: int, fit_images: int = 2000):
        flat = tokens.reshape(-1, tokens.shape[-1])  # (N*T, H)
        self.mean, self.std = flat.mean(0), flat.std(0) + 1e-6
        z = ((tokens[:fit_images] - self.mean) / self.std).reshape(-1, tokens.shape[-1])
        eigenvalues, vectors = torch.linalg.eigh(torch.cov(z.T))  # ascending
        self.eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
        k = components or tokens.shape[-1]
        self.basis, self.scale = vectors[:, :k], self.eigenvalues[:k].sqrt() + 1e-6  # (H, K), (K,)

    def explained(self, k: int) -> float:
        return float(self.eigenvalues[:k].sum() / self.eigenvalues.sum())

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return ((tokens - self.mean) / self.std) @ self.basis / self.scale  # (N, T, K)


class CellReadout:
    """Linear least-squares read-outs of each token's cell: shape or none, colour or none."""

    def __init__(self, tokens: torch.Tensor, scenes: list, grid: int):
        shapes, colours = zip(*[scene_cell_labels(s, grid) for s in scenes], strict=True)
        x = self._design(tokens.reshape(-1, tokens.shape[-1]))  # (N*T, K+1)
        self.grid = grid
        self.shape = torch.linalg.lstsq(x, F.one_hot(torch.cat(shapes), NO_OBJECT_SHAPE + 1).float()).solution
        self.colour = torch.linalg.lstsq(
            x, F.one_hot(torch.cat(colours), NO_OBJECT_COLOR + 1).float()
        ).solution

    @staticmethod
    def _design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)  # (M, K+1): with an intercept

    def classes(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., T, K) tokens -> (..., T) shape and colour class indices (the last class of each is none)."""
        x = self._design(tokens.reshape(-1, tokens.shape[-1]))
        shape, colour = (x @ self.shape).argmax(1), (x @ self.colour).argmax(1)
        return shape.reshape(tokens.shape[:-1]), colour.reshape(tokens.shape[:-1])

    def accuracy(self, tokens: torch.Tensor, scenes: list) -> dict[str, float]:
        shapes, colours = zip(*[scene_cell_labels(s, self.grid) for s in scenes], strict=True)
        shape, colour = self.classes(tokens)
        true_shape, true_colour = torch.stack(shapes), torch.stack(colours)  # (N, T)
        objects = true_shape != NO_OBJECT_SHAPE
        return {
            "object_or_none": float(((shape != NO_OBJECT_SHAPE) == objects).float().mean()),
            "shape_at_objects": float((shape == true_shape)[objects].float().mean()),
            "colour_at_objects": float((colour == true_colour)[objects].float().mean()),
        }

    def detections(self, tokens: torch.Tensor, image_size: int) -> list[Detection]:
        """(T, K) tokens of one image -> one judge detection per cell read as an object; its box is the cell."""
        shape, colour = self.classes(tokens)
        cell = image_size / self.grid
        found = []
        for index in (shape != NO_OBJECT_SHAPE).nonzero().flatten().tolist():
            row, col = divmod(index, self.grid)
            name = COLOR_NAMES[colour[index]] if colour[index] != NO_OBJECT_COLOR else None
            box = (col * cell + 2, row * cell + 2, (col + 1) * cell - 2, (row + 1) * cell - 2)
            found.append(Detection(SHAPES[shape[index]], name, box, 1.0))
        return found


def token_judge(readout: CellReadout, tokens: torch.Tensor, records: list[dict], image_size: int) -> dict:
    """ShapesGenEval of token grids (P, T, K) read by `readout`: overall (mean of categories) and per category."""
    correct: dict[str, list[bool]] = {}
    for record, grid in zip(records, tokens, strict=True):
        ok, _ = score_detections(record, readout.detections(grid, image_size))
        correct.setdefault(record["tag"], []).append(ok)
    per_category = {tag: round(float(np.mean(v)), 3) for tag, v in correct.items()}
    return {"overall": round(float(np.mean(list(per_category.values()))), 3), **per_category}


@torch.no_grad()
def vision_tokens(model: Blip3o, images: list, batch: int = 500) -> torch.Tensor:
    return torch.cat(
        [
            model.backbone.vision_tokens(images[i : i + batch]).float().cpu()
            for i in range(0, len(images), batch)
        ]
    )  # (N, T, H), on the CPU


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder (its backbone, queries and DiT config are used)")
    parser.add_argument("--components", type=int, default=16, help="principal components per token (0: all)")
    parser.add_argument("--scenes", type=int, default=20_000, help="random training renders (world seed 0)")
    parser.add_argument("--instruct", type=int, default=6, help="renders per GenEval-style training prompt")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=120, help="evaluation prompts, category-balanced")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--sample-steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument("--decoder-steps", type=int, default=0, help="also train a pixel decoder (0: no)")
    parser.add_argument("--decoder-batch", type=int, default=16)
    parser.add_argument(
        "--decoder-sampling",
        type=sampler_setting,
        nargs="+",
        default=[(10, 1.0)],
        metavar="STEPS:CFG",
        help="decoder sampler settings to judge (Euler steps : CFG scale)",
    )
    parser.add_argument("--device", default="cpu", help="where the DiT and decoder train (e.g. cuda)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write a JSON-lines log and image grids here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1: the decoder's end-to-end row uses the DiT's last samples")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Blip3o.from_pretrained(args.model).to(device).eval()
    size = model.config.clip.image_size
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            with (args.out / "log.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(args.scenes)]
    prompt_rng = np.random.default_rng(11)
    instruct = [(r["prompt"], scene_for_prompt(r, prompt_rng)) for r in load_train_prompts() * args.instruct]
    images = [render(s) for s in scenes] + [render(s) for _, s in instruct]
    raw = vision_tokens(model, images)  # (N, T, H)
    basis = TokenBasis(raw, args.components)
    tokens = basis(raw)  # (N, T, K)
    grid = int(tokens.shape[1] ** 0.5)
    n_fit = args.scenes * 3 // 4
    readout = CellReadout(tokens[:n_fit], scenes[:n_fit], grid)
    records = [r for _, r in balanced_subset(load_eval_prompts(), args.prompts)]
    eval_rng = np.random.default_rng(5)
    eval_images = [render(scene_for_prompt(r, eval_rng)) for r in records]
    eval_tokens = basis(vision_tokens(model, eval_images))  # (P, T, K)
    log(
        {
            "tokens": list(tokens.shape[1:]),
            "explained": {k: round(basis.explained(k), 3) for k in (4, 8, 16, 32) if k <= raw.shape[-1]},
            "readout_held_out": {
                k: round(v, 3)
                for k, v in readout.accuracy(tokens[n_fit : args.scenes], scenes[n_fit:]).items()
            },
            "token_judge_real": token_judge(readout, eval_tokens, records, size),
        }
    )

    captions = [
        a.short_caption if rng.random() < 0.1 else a.long_caption for a in (annotate(s, rng) for s in scenes)
    ] + [p for p, _ in instruct]  # the recipe's stage-2 caption mix, then stage 3's prompts
    with torch.no_grad():
        conditions = model_conditions(model, captions)  # (N, Q, H)
        prompt_conditions = model_conditions(model, [r["prompt"] for r in records])  # (P, Q, H)
    targets = tokens_to_grid(tokens).contiguous().to(device)  # (N, K, g, g)
    print(f"{len(targets)} targets {tuple(targets.shape[1:])} in {time.perf_counter() - started:.0f} s")

    dit = DiT(replace(model.config.dit, input_size=grid, in_channels=targets.shape[1])).to(device)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def sample(scale: float) -> torch.Tensor:
        noise = torch.randn((len(records), *targets.shape[1:]), generator=torch.Generator().manual_seed(0))
        x = model.objective.sample(
            dit, noise.to(device), prompt_conditions, steps=args.sample_steps, cfg_scale=scale
        )
        return grid_to_tokens(x).cpu()  # (P, T, K)

    training = dit_training(dit, targets, conditions, model.config.flow, args.lr, args.batch, generator)
    for step, running, train_s in training:
        if step % args.eval_every == 0 or step == args.steps:
            dit.eval()
            row = {"step": step, "loss": round(running, 4), "steps_per_s": round(step / train_s, 2)}
            samples = {scale: sample(scale) for scale in args.cfg}  # (P, T, K) each; the last ones go on
            for scale, generated in samples.items():
                row[f"token_judge@{scale:g}"] = token_judge(readout, generated, records, size)
            log(row)
            dit.train()
        if step == args.steps:
            break
    if args.decoder_steps:
        train_decoder(args, images, tokens, eval_images, eval_tokens, records, samples, log)


def sampler_setting(text: str) -> tuple[int, float]:
    """Parse a sampler setting: "50:3" is (50 Euler steps, CFG scale 3.0)."""
    try:
        steps, scale = text.split(":")
        setting = int(steps), float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEPS:CFG such as 50:3, got {text!r}") from None
    if setting[0] < 1:
        raise argparse.ArgumentTypeError(f"need at least 1 sampling step, got {text!r}")
    return setting


def train_decoder(args, images, tokens, eval_images, eval_tokens, records, samples, log) -> None:
    """A pixel decoder on the K-channel tokens; the pixel judge on its round trip and on the DiT's final
    samples (`samples`: CFG scale -> (P, T, K) tokens), at each decoder sampler setting."""
    config = decoder_config(
        "tiny_spatial", num_feature_tokens=tokens.shape[1], feature_dim=tokens.shape[2]
    )  # fmt: skip
    decoder = PixelDecoder(config).to(args.device)
    pixels = images_to_tensor(images)  # (N, 3, S, S)
    log({"renders_themselves": judge_images(eval_images, records)})
    training = decoder_training(decoder, pixels, tokens, args.decoder_batch, torch.Generator().manual_seed(1))
    for step, loss in training:
        if step % 200 == 0:
            print(f"decoder step {step}: loss {loss:.4f}", flush=True)
        if step == args.decoder_steps:
            break
    decoder.eval()
    titles = [r["prompt"] for r in records]

    @torch.no_grad()
    def draw(tokens: torch.Tensor, n: int, cfg: float) -> list:
        """(P, T, K) tokens -> P images, `n` Euler steps at CFG `cfg`, the same noise for every call."""
        decoded = decoder.decode(
            tokens.to(args.device), steps=n, cfg_scale=cfg, generator=torch.Generator().manual_seed(0)
        )  # (P, 3, S, S)
        return tensor_to_images(decoded)

    row = {"decoder_step": args.decoder_steps}
    for n, cfg in args.decoder_sampling:
        # One setting keeps the plain keys and file names; several are told apart by "@{steps}x{cfg}".
        tag = f"@{n}x{cfg:g}" if len(args.decoder_sampling) > 1 else ""
        round_trip = draw(eval_tokens, n, cfg)
        row[f"round_trip{tag}"] = judge_images(round_trip, records)
        drawn = {scale: draw(generated, n, cfg) for scale, generated in samples.items()}
        for scale, images_ in drawn.items():
            row[f"end_to_end@{scale:g}{tag}"] = judge_images(images_, records)
        if args.out:
            title = f"round trip{tag}"
            image_grid(round_trip, titles, columns=10, cell=96, title=title).save(
                args.out / f"round_trip{tag}.png"
            )
            for scale, images_ in drawn.items():
                title = f"end to end, CFG {scale:g}{tag}"
                image_grid(images_, titles, columns=10, cell=96, title=title).save(
                    args.out / f"end_to_end_cfg{scale:g}{tag}.png"
                )
    log(row)


if __name__ == "__main__":
    main()
