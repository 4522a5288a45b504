"""How far could an object-centric generation target go? The DiT and the pixel decoder on "ideal" tokens.

    .venv/bin/python bench/ideal_target.py MODEL [--steps 3000] [--eval-every 600]
        [--condition scene|model|bag|readout|slots [--readout-queries K] [--slot-steps N]] [--with-prompt] [--standardize] [--slots S]
        [--dit-layers N] [--dit-dim D]
        [--decoder-steps 1500 --decoder-preset tiny_footprint] [--out DIR]

Every CLIP-like target tried so far spreads one object over 2x2 to 3x3 tokens that the DiT must make agree
(bench/dit_locality.py), and it does not learn that at CPU scale (README, "Where it fails"). This bench asks
what a target with one token per object would give, before any encoder is trained to produce one. Each cell
of the 8x8 grid (8 px) holds the scene's background colour; the cell holding an object's box centre also holds
its presence, shape and colour (one-hot), the centre's offset in the cell, its size and rotation (21
channels, `ideal_tokens`, standardised per channel over the training scenes). No two centres share a cell:
boxes are at least 12 px wide and 2 px apart.

- DiT: a fresh DiT of MODEL's config learns these tokens by flow matching from the exact scene condition of
  bench/oracle_condition.py (objects placed in 3x3 coarse cells), or with `--condition model` MODEL's frozen
  backbone and queries on the scenes' captions (`--short-captions`: the share of short ones; the recipe: 0.1),
  or with `--condition bag` one token per object (its shape and colour, no position, in random order): what
  reading the objects out of a condition costs, against sampling their layout. Ways to derive a condition
  from the model's (docs/bench/object_target.txt, session 21): `--with-prompt` adds the prompt tokens' states
  to the queries', `--slots S` makes S tokens by learnt per-slot maps of the pooled states (`SlotReader`),
  `--condition readout` reads bag tokens in the caption's order out of them by ridge regression;
  `--condition slots` gives the DiT the slots of the recipe's condition resampler, taught to name one object each
  (session 22).
  Every `--eval-every` steps it samples the balanced ShapesGenEval prompts, and a token judge scores them:
  each cell whose presence reads over 0.5 is one detection, with its shape, colour and box read from the
  token, scored by ShapesGenEval's own rules. The same judge on the tokens of a scene built for each prompt
  is the ceiling (1.0 up to the square box it assumes).
- Decoder (`--decoder-steps N`): a fresh pixel decoder of `--decoder-preset` learns renders from the tokens,
  and the real pixel judge scores its round trip (the prompts' scenes' tokens -> images).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blip3o.eval.geneval import score_detection_lists
from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens
from blip3o.models.condition_resampler import ConditionResampler
from blip3o.models.decoder import PixelDecoder, decoder_config, images_to_tensor, tensor_to_images
from blip3o.models.dit import DiT
from blip3o.train.slot_supervision import SlotLabelHead
from blip3o.viz import image_grid
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.judge import Detection
from blip3o.world.language import caption_objects
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, IMAGE_SIZE, MAX_BOX, MAX_ROTATION, MIN_BOX, SHAPES, Scene
from oracle_condition import (  # bench/ on sys.path
    SceneCondition,
    adamw_update,
    caption_conditions,
    decoder_training,
    dit_training,
    judge_images,
    left_pad,
    model_conditions,
    scene_captions,
)


class BagCondition:
    """A scene as a bag of objects: (9, H), token i = object i's shape + colour embedding (fixed random ones, as
    `SceneCondition`'s) in a random order, zeros after the last object. No position: the DiT must lay them out."""

    def __init__(self, width: int, seed: int = 99, slots: int = 9):
        cells = SceneCondition(width, IMAGE_SIZE, seed)
        self.shape, self.color, self.slots, self.width = cells.shape, cells.color, slots, width

    def __call__(self, scene: Scene, rng: np.random.Generator) -> torch.Tensor:
        if len(scene.objects) > self.slots:
            raise ValueError(f"a bag holds {self.slots} objects, the scene has {len(scene.objects)}")
        tokens = torch.zeros(self.slots, self.width)  # (9, H)
        for slot, index in enumerate(rng.permutation(len(scene.objects))):
            obj = scene.objects[index]
            tokens[slot] = self.shape[SHAPES.index(obj.shape)] + self.color[COLOR_NAMES.index(obj.color)]
        return tokens


GRID = 8
CELL = IMAGE_SIZE / GRID
# Channel layout of one token.
BACKGROUND = slice(0, 3)
PRESENCE = 3
SHAPE = slice(4, 4 + len(SHAPES))
COLOUR = slice(SHAPE.stop, SHAPE.stop + len(COLOR_NAMES))
OFFSET_X, OFFSET_Y, SIZE, ROTATION = range(COLOUR.stop, COLOUR.stop + 4)
CHANNELS = ROTATION + 1
MID_BOX, HALF_RANGE = (MIN_BOX + MAX_BOX) / 2, (MAX_BOX - MIN_BOX) / 2


def readout_conditions(model, scenes, records, rng, args) -> tuple[torch.Tensor, torch.Tensor]:
    """`--condition readout`: bag tokens in the order the caption names the objects, read out of the model's
    condition by one ridge regression from its pooled (mean over queries, standardised) states; fitted on the
    training captions and applied to them and to the prompts. What a linear slot head on the queries could give."""
    bag = BagCondition(model.config.dit.latent_embedding_size)
    captions = scene_captions(scenes, rng, args.short_captions)
    targets = torch.zeros(len(captions), bag.slots, bag.width)  # (N, 9, H)
    for row, caption in enumerate(captions):
        for slot, (shape, color) in enumerate(caption_objects(caption)[: bag.slots]):  # (all coloured)
            targets[row, slot] = bag.shape[SHAPES.index(shape)] + bag.color[COLOR_NAMES.index(color)]
    k = args.readout_queries

    def features(conditions: torch.Tensor) -> torch.Tensor:  # (n, Q, H) -> (n, H) mean, or (n, k H) first k
        return (conditions[:, :k].flatten(1) if k else conditions.mean(1)).double()

    pooled = features(model_conditions(model, captions))  # (N, F)
    prompt_pooled = features(model_conditions(model, [r["prompt"] for r in records]))  # (P, F)
    mean, std = pooled.mean(0), pooled.std(0) + 1e-6

    def design(states: torch.Tensor) -> torch.Tensor:
        """Standardised features and a constant column, (n, F + 1)."""
        return torch.cat([(states - mean) / std, torch.ones(len(states), 1, dtype=torch.double)], 1)

    x, y = design(pooled), targets.flatten(1).double()  # (N, F + 1), (N, 9H)
    ridge = torch.eye(x.shape[1], dtype=torch.double)  # lambda 1
    weights = torch.linalg.solve(x.T @ x + ridge, x.T @ y)  # (F + 1, 9H)
    fitted = (x @ weights).float().view_as(targets)  # (N, 9, H)
    readout = (design(prompt_pooled) @ weights).float().view(len(records), bag.slots, bag.width)  # (P, 9, H)
    residual = (fitted - targets).pow(2).mean() / targets.pow(2).mean()
    print(f"readout: relative training residual {residual.item():.3f}", flush=True)
    return fitted, readout


def slot_conditions(model, scenes, records, rng, args) -> tuple[torch.Tensor, torch.Tensor]:
    """`--condition slots`: the recipe's condition resampler (9 slots, 2 layers; models/condition_resampler.py)
    over the model's condition, trained alone by the slot-label loss (train/slot_supervision.py) for
    `--slot-steps` on all but the last 1,000 training captions, then frozen: the DiT reads its slots. Prints the
    held-out slot accuracies."""
    captions = scene_captions(scenes, rng, args.short_captions)
    states = model_conditions(model, captions)  # (N, Q, H)
    prompt_states = model_conditions(model, [r["prompt"] for r in records])  # (P, Q, H)
    resampler = ConditionResampler(states.shape[-1], slots=9, layers=2, heads=4)
    head = SlotLabelHead(states.shape[-1])
    update = adamw_update([*resampler.parameters(), *head.parameters()], 1e-3, warmup_steps=100)
    fit = max(len(captions) - 1000, 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.slot_steps):
        rows = torch.randint(fit, (64,), generator=generator).tolist()
        loss, _ = head.loss(resampler(states[rows]), [captions[i] for i in rows], [scenes[i] for i in rows])
        update(loss)
    with torch.no_grad():
        held_out = range(fit, len(captions)) if fit < len(captions) else range(len(captions))
        _, metrics = head.loss(
            resampler(states[list(held_out)]), [captions[i] for i in held_out], [scenes[i] for i in held_out]
        )
        print("slots, held out:", {k: round(float(v), 3) for k, v in metrics.items()}, flush=True)
        slots = torch.cat([resampler(states[i : i + 1000]) for i in range(0, len(states), 1000)])  # (N, 9, H)
        return slots, resampler(prompt_states)  # (P, 9, H)


class SlotReader(torch.nn.Module):
    """A DiT that reads `slots` tokens made from its condition: token k = LayerNorm(A_k @ LayerNorm(mean of the
    condition's tokens) + b_k), one linear map per slot, learnt with the DiT. Why: every query state holds every
    object (a linear probe reads the first and second object's shape and colour from any one of them), so a
    per-slot linear map can pull one object into each token, the form the DiT reads well (`--condition bag`).
    A zeroed (dropped) condition gives the same learnt constant tokens whatever the prompt."""

    def __init__(self, dit: DiT, slots: int) -> None:
        super().__init__()
        self.dit, width = dit, dit.config.latent_embedding_size
        self.maps = torch.nn.Parameter(torch.randn(slots, width, width) / width**0.5)  # (S, H, H)
        self.bias = torch.nn.Parameter(torch.zeros(slots, width))  # (S, H)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.layer_norm(condition.mean(1), condition.shape[-1:])  # (B, H)
        tokens = torch.einsum("bh,sgh->bsg", pooled, self.maps) + self.bias  # (B, S, H)
        return self.dit(x, timestep, torch.nn.functional.layer_norm(tokens, tokens.shape[-1:]))


def ideal_tokens(scene: Scene) -> torch.Tensor:
    """(CHANNELS, 8, 8) unstandardised tokens of one scene (layout in the module docstring)."""
    tokens = torch.zeros(CHANNELS, GRID, GRID)
    background = torch.tensor(scene.background, dtype=torch.float32) / 255.0  # in [200, 255] / 255
    tokens[BACKGROUND] = ((background - 0.9) * 10)[:, None, None]  # about [-1, 1]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        col, row = min(int(cx / CELL), GRID - 1), min(int(cy / CELL), GRID - 1)
        token = tokens[:, row, col]
        token[PRESENCE] = 1.0
        token[SHAPE.start + SHAPES.index(obj.shape)] = 1.0
        token[COLOUR.start + COLOR_NAMES.index(obj.color)] = 1.0
        token[OFFSET_X] = (cx - (col + 0.5) * CELL) / (CELL / 2)  # in [-1, 1]
        token[OFFSET_Y] = (cy - (row + 0.5) * CELL) / (CELL / 2)
        token[SIZE] = ((x1 - x0 + y1 - y0) / 2 - MID_BOX) / HALF_RANGE
        token[ROTATION] = obj.rotation / MAX_ROTATION
    return tokens


def token_detections(tokens: torch.Tensor) -> list[Detection]:
    """(CHANNELS, 8, 8) unstandardised tokens -> one judge detection per cell whose presence is over 0.5. The
    box is a square of the token's mean size (the token keeps no aspect ratio)."""
    found = []
    for row, col in (tokens[PRESENCE] > 0.5).nonzero().tolist():
        token = tokens[:, row, col]
        cx = (col + 0.5) * CELL + float(token[OFFSET_X]) * CELL / 2
        cy = (row + 0.5) * CELL + float(token[OFFSET_Y]) * CELL / 2
        half = (MID_BOX + float(token[SIZE]) * HALF_RANGE) / 2
        shape, colour = SHAPES[int(token[SHAPE].argmax())], COLOR_NAMES[int(token[COLOUR].argmax())]
        found.append(
            Detection(shape, colour, (cx - half, cy - half, cx + half, cy + half), float(token[PRESENCE]))
        )
    return found


def token_geneval(tokens: torch.Tensor, records: list[dict]) -> dict:
    """ShapesGenEval of (P, CHANNELS, 8, 8) unstandardised token grids, one per prompt record."""
    return score_detection_lists(records, [token_detections(grid) for grid in tokens])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", help="a saved model folder: its DiT config and flow settings (and condition)"
    )
    parser.add_argument("--scenes", type=int, default=20_000, help="training scenes (world seed 0)")
    parser.add_argument("--steps", type=int, default=3000, help="DiT steps (0: decoder only)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--prompts", type=int, default=240, help="balanced ShapesGenEval prompts judged")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--sample-steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument("--condition", choices=("scene", "model", "bag", "readout", "slots"), default="scene")
    parser.add_argument("--slot-steps", type=int, default=4000, help="--condition slots: resampler steps")
    parser.add_argument("--short-captions", type=float, default=0.1, help="--condition model: short share")
    parser.add_argument(
        "--with-prompt", action="store_true", help="--condition model: the prompt tokens' states too"
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="S > 0: the DiT reads S tokens, each its own map of the pooled condition",
    )
    parser.add_argument(
        "--readout-queries",
        type=int,
        default=0,
        help="--condition readout: from the first K query states (0: mean)",
    )
    parser.add_argument(
        "--standardize", action="store_true", help="--condition model: standardise each position and channel"
    )
    parser.add_argument("--dit-layers", type=int, help="DiT depth (default: the model's)")
    parser.add_argument("--dit-dim", type=int, help="DiT width (default: the model's)")
    parser.add_argument("--decoder-steps", type=int, default=0)
    parser.add_argument("--decoder-batch", type=int, default=16)
    parser.add_argument("--decoder-preset", default="tiny_footprint")
    parser.add_argument("--decoder-scenes", type=int, default=8000, help="renders the decoder learns from")
    parser.add_argument("--decoder-eval-every", type=int, default=500)
    parser.add_argument("--decoder-sample-steps", type=int, default=10, help="the shapes recipe's setting")
    parser.add_argument("--decoder-cfg", type=float, default=1.0, help="the shapes recipe's setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write grids, samples and a JSON-lines log here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[dict] = []
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def log(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with (args.out / "log.jsonl").open("a") as file:
                file.write(json.dumps(row) + "\n")

    model = Blip3o.from_pretrained(args.model).eval()
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(args.scenes)]
    raw = torch.stack([ideal_tokens(s) for s in scenes])  # (N, C, 8, 8)
    mean, std = raw.mean((0, 2, 3), keepdim=True), raw.std((0, 2, 3), keepdim=True) + 1e-6  # (1, C, 1, 1)
    targets = (raw - mean) / std  # (N, C, 8, 8)
    records = [r for _, r in balanced_subset(load_eval_prompts(), args.prompts)]
    prompt_scenes = [scene_for_prompt(r, np.random.default_rng(5 + i)) for i, r in enumerate(records)]
    prompt_targets = (torch.stack([ideal_tokens(s) for s in prompt_scenes]) - mean) / std  # (P, C, 8, 8)
    log({"ceiling": token_geneval(prompt_targets * std + mean, records)})
    if args.decoder_steps:
        train_decoder(args, scenes, targets, prompt_scenes, prompt_targets, records, log)
    if args.steps:
        if args.condition == "scene":
            encode = SceneCondition(model.config.dit.latent_embedding_size, IMAGE_SIZE)
            conditions = torch.stack([encode(s) for s in scenes])  # (N, 9, H)
            prompt_conditions = torch.stack([encode(s) for s in prompt_scenes])  # (P, 9, H)
        elif args.condition == "bag":
            bag, order = BagCondition(model.config.dit.latent_embedding_size), np.random.default_rng(3)
            conditions = torch.stack([bag(s, order) for s in scenes])  # (N, 9, H)
            prompt_conditions = torch.stack([bag(s, order) for s in prompt_scenes])  # (P, 9, H)
        elif args.condition == "readout":
            conditions, prompt_conditions = readout_conditions(model, scenes, records, rng, args)
        elif args.condition == "slots":
            conditions, prompt_conditions = slot_conditions(model, scenes, records, rng, args)
        else:
            prompts = [r["prompt"] for r in records]
            conditions = caption_conditions(
                model, scenes, rng, args.short_captions, args.with_prompt
            )  # (N, L, H): L = Q, or T + Q with the prompt
            prompt_conditions = model_conditions(model, prompts, with_prompt=args.with_prompt)  # (P, L', H)
            conditions, prompt_conditions = left_pad([conditions, prompt_conditions])  # one length L
            if args.standardize:
                # Each query state is mostly its own query's constant (within a prompt the states' spread is
                # rms 1.2, across prompts their mean moves by 0.2): keep only what the prompt changes.
                centre = conditions.mean(0)  # (L, H): per position and channel
                scale = conditions.std(0) + 1e-3  # (L, H)
                conditions = (conditions - centre) / scale
                prompt_conditions = (prompt_conditions - centre) / scale
        train_dit(args, model, targets, conditions, prompt_conditions, mean, std, records, log)
    return rows


def train_dit(args, model, targets, conditions, prompt_conditions, mean, std, records, log) -> None:
    sizes = {"n_layers": args.dit_layers, "dim": args.dit_dim}
    dit = DiT(replace(model.config.dit, in_channels=CHANNELS, **{k: v for k, v in sizes.items() if v}))
    print(f"DiT {dit.num_params():,} params on {tuple(targets.shape[1:])} tokens", flush=True)
    if args.slots:
        dit = SlotReader(dit, args.slots)
    training = dit_training(
        dit, targets, conditions, model.config.flow, args.lr, args.batch, torch.Generator().manual_seed(0)
    )
    for step, running, train_s in training:
        if step % args.eval_every and step != args.steps:
            continue
        dit.eval()
        row = {"step": step, "loss": round(running, 4), "steps_per_s": round(step / train_s, 2)}
        noise = torch.randn((len(records), *targets.shape[1:]), generator=torch.Generator().manual_seed(0))
        for scale in args.cfg:
            with torch.no_grad():
                sample = model.objective.sample(
                    dit, noise, prompt_conditions, steps=args.sample_steps, cfg_scale=scale
                )  # (P, C, 8, 8)
            row[f"cfg{scale:g}"] = token_geneval(sample * std + mean, records)
            if args.out:
                torch.save(sample, args.out / f"dit_samples_step{step}_cfg{scale:g}.pt")
        log(row)
        dit.train()
        if step == args.steps:
            break


def train_decoder(args, scenes, targets, prompt_scenes, prompt_targets, records, log) -> None:
    config = decoder_config(args.decoder_preset, num_feature_tokens=GRID * GRID, feature_dim=CHANNELS)
    decoder = PixelDecoder(config)
    n = min(len(scenes), args.decoder_scenes)
    pixels = images_to_tensor([render(s) for s in scenes[:n]])  # (n, 3, 64, 64)
    tokens = grid_to_tokens(targets[:n])  # (n, 64, C)
    eval_tokens = grid_to_tokens(prompt_targets)  # (P, 64, C)
    log({"renders_themselves": judge_images([render(s) for s in prompt_scenes], records)})
    tick = time.perf_counter()
    training = decoder_training(decoder, pixels, tokens, args.decoder_batch, torch.Generator().manual_seed(1))
    for step, loss in training:
        if step % args.decoder_eval_every and step != args.decoder_steps:
            continue
        decoder.eval()
        with torch.no_grad():
            decoded = decoder.decode(
                eval_tokens, args.decoder_sample_steps, args.decoder_cfg, torch.Generator().manual_seed(0)
            )  # (P, 3, 64, 64)
        images = tensor_to_images(decoded)
        log(
            {
                "decoder_step": step,
                "loss": round(loss, 4),
                "steps_per_s": round(step / (time.perf_counter() - tick), 2),
                "round_trip": judge_images(images, records),
            }
        )
        if args.out:
            titles = [r["prompt"] for r in records[:60]]
            title = f"{args.decoder_preset} decoder, step {step}: ideal tokens -> pixels"
            image_grid(images[:60], titles, columns=10, cell=96, title=title).save(
                args.out / f"round_trip_step{step}.png"
            )
        decoder.train()
        if step == args.decoder_steps:
            break


if __name__ == "__main__":
    main()
