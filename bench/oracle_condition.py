"""Can the DiT learn to draw shapes when its condition is perfect? A fresh DiT, trained on real CLIP targets.

    .venv/bin/python bench/oracle_condition.py MODEL [--components 16] [--steps 6000] [--batch 64] [--lr 2e-3]
        [--eval-every 1000] [--device cuda --bf16] [--out DIR]

This separates the DiT from the backbone. The condition is an exact encoding of the scene instead of the
backbone's query states: one token per cell of a 3x3 grid, holding a fixed random embedding of the cell plus,
for the object centred there, fixed random embeddings of its shape and colour. The target is the saved model's
own CLIP encoder on N fresh ShapesWorld renders, cut to the top K principal components (`--components`, 0 =
all channels; `ClipConfig.target_components`), and samples go back through the model's own pixel decoder. Every
`--eval-every` steps the DiT samples one image for each of 60 ShapesGenEval prompts (a scene built for each
prompt gives the condition), at each `--cfg` scale, and the judge scores them: the share of images where it
finds any object, and ShapesGenEval on those prompts. A target or DiT change that does not draw objects here
cannot do so from the weaker real condition either. `--condition model` swaps in the saved model's own
condition (its frozen backbone and queries on each scene's caption, and on the prompt text when sampling), to
measure what the real condition costs at the same DiT, target and steps. Figures on the bundled model's encoder: README, "Where it
fails".
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blip3o.eval.geneval import score_detections
from blip3o.eval.model_eval import balanced_subset
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import ClipEncoder, grid_to_tokens, tokens_to_grid
from blip3o.models.decoder import tensor_to_images
from blip3o.models.dit import DiT
from blip3o.transport.flow_matching import flow_matching_loss
from blip3o.viz import image_grid
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.judge import detect
from blip3o.world.language import annotate
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLOR_NAMES, SHAPES

CELLS = 3  # the condition's grid side: 9 tokens


class SceneCondition:
    """Exact scene encoding: (9, H) per scene, from fixed random cell / shape / colour embeddings."""

    def __init__(self, width: int, image_size: int, seed: int = 99):
        gen = torch.Generator().manual_seed(seed)
        self.cell = 0.5 * torch.randn(CELLS * CELLS, width, generator=gen)  # (9, H)
        self.shape = torch.randn(len(SHAPES), width, generator=gen)  # (5, H)
        self.color = torch.randn(len(COLOR_NAMES), width, generator=gen)  # (8, H)
        self.cell_size = image_size / CELLS

    def __call__(self, scene) -> torch.Tensor:
        tokens = self.cell.clone()  # (9, H)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            row = min(int((y0 + y1) / 2 / self.cell_size), CELLS - 1)
            col = min(int((x0 + x1) / 2 / self.cell_size), CELLS - 1)
            tokens[row * CELLS + col] += (
                self.shape[SHAPES.index(obj.shape)] + self.color[COLOR_NAMES.index(obj.color)]
            )
        return tokens


@torch.no_grad()
def encode_targets(
    model: Blip3o, images: list, components: int, batch: int = 256
) -> tuple[torch.Tensor, ClipEncoder]:
    """(N, K, g, g) targets of `images` and the encoder that defines them (the model's towers, K components
    fitted on the first 1,024 images; K = 0 keeps every channel)."""
    clip = model.clip
    raw = torch.cat(
        [
            clip.encode_image_raw(clip.preprocess(images[i : i + batch]).to(model.device))
            for i in range(0, len(images), batch)
        ]
    )  # (N, T, D)
    cut = clip.with_target_components(components, raw[:1024])
    return tokens_to_grid(cut.features_to_target(cut.normalize_features(raw))), cut  # (N, K, g, g)


@torch.no_grad()
def decode_targets(model: Blip3o, cut: ClipEncoder, x: torch.Tensor, steps: int | None, seed: int) -> list:
    """(B, K, g, g) generated targets -> images through the model's pixel decoder (in its own feature space)."""
    raw = cut.denormalize_features(cut.target_to_features(grid_to_tokens(x.float())))  # (B, T, D)
    features = model.clip.normalize_features(raw)  # (B, T, D), what the decoder was trained on
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return tensor_to_images(model.decoder.decode(features, steps=steps, generator=generator))


def judge_images(images: list, records: list[dict]) -> dict[str, float]:
    """The judge on one image per prompt record: the share of images with any object found, and ShapesGenEval."""
    detections = [detect(image) for image in images]
    return {
        "found": round(float(np.mean([len(d) > 0 for d in detections])), 3),
        "geneval": round(
            float(np.mean([score_detections(r, d)[0] for r, d in zip(records, detections, strict=True)])), 3
        ),
    }


@torch.no_grad()
def model_conditions(
    model: Blip3o, texts: list[str], batch: int = 256, with_prompt: bool = False
) -> torch.Tensor:
    """The saved model's own condition (frozen backbone + queries) for each text: (N, Q, H). `with_prompt`: the
    last-layer states of the prompt's tokens too, left-padded with zeros to the longest text: (N, T + Q, H)."""
    if not with_prompt:
        return torch.cat([model.condition(texts[i : i + batch]).float() for i in range(0, len(texts), batch)])
    chunks = []
    for i in range(0, len(texts), batch):
        inputs = model.backbone.generation_inputs(texts[i : i + batch])
        mask = inputs["attention_mask"].to(model.device)  # (B, T + Q)
        hidden = model.backbone.generation_hidden_states(inputs["input_ids"].to(model.device), mask)
        chunks.append(hidden.float() * mask[..., None])  # (B, T + Q, H), zeros at the padding
    return torch.cat(left_pad(chunks))


def left_pad(conditions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Conditions (n_i, L_i, H) left-padded with zeros to the longest L, as the backbone pads its rows."""
    length = max(c.shape[1] for c in conditions)
    return [torch.nn.functional.pad(c, (0, 0, length - c.shape[1], 0)) for c in conditions]


def caption_conditions(
    model: Blip3o, scenes: list, rng: np.random.Generator, short_share: float = 0.1, with_prompt: bool = False
) -> torch.Tensor:
    """The saved model's condition for each scene's caption (`scene_captions`): (N, Q, H)."""
    return model_conditions(model, scene_captions(scenes, rng, short_share), with_prompt=with_prompt)


def scene_captions(scenes: list, rng: np.random.Generator, short_share: float = 0.1) -> list[str]:
    """Each scene's caption: a short one with probability `short_share` (the recipe's stage-2 mix: 10%), else
    the long one."""
    return [
        a.short_caption if rng.random() < short_share else a.long_caption
        for a in (annotate(s, rng) for s in scenes)
    ]


def adamw_update(parameters, lr: float, warmup_steps: int):
    """AdamW at `lr` without weight decay and a linear warm-up over `warmup_steps`; returns `update(loss)`, one
    optimizer step: backward, gradients clipped to 1.0, step, schedule step."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        warmup.step()

    return update


def dit_training(dit: DiT, targets: torch.Tensor, conditions: torch.Tensor, flow, lr: float, batch: int,
                 generator: torch.Generator, bf16: bool = False):  # fmt: skip
    """Train `dit` by flow matching on `targets` (N, C, h, w) given `conditions` (N, L, H): AdamW at `lr`, no
    weight decay, 200 warm-up steps, gradients clipped to 1.0, random batches drawn from `generator`. Yields
    (step, smoothed loss, training seconds) after each step for as long as the caller iterates; what the caller
    does between steps (sampling, judging) is not counted."""
    update = adamw_update(dit.parameters(), lr, warmup_steps=200)
    running, train_s, step = None, 0.0, 0
    while True:
        tick = time.perf_counter()
        index = torch.randint(len(targets), (batch,), generator=generator)
        with torch.autocast(targets.device.type, torch.bfloat16, enabled=bf16):
            loss, _ = flow_matching_loss(
                dit, targets[index], conditions[index], generator=generator, cfg=flow
            )
        update(loss)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        train_s += time.perf_counter() - tick
        yield step, running, train_s


def decoder_training(
    decoder, pixels: torch.Tensor, tokens: torch.Tensor, batch: int, generator: torch.Generator
):
    """Train a pixel decoder on images `pixels` (N, 3, S, S) in [-1, 1] from their tokens (N, T, K): AdamW at
    1e-3, no weight decay, 100 warm-up steps, gradients clipped to 1.0, random batches drawn from `generator`
    (moved to the decoder's device). Yields (step, loss) after each step for as long as the caller iterates."""
    device = next(decoder.parameters()).device
    update = adamw_update(decoder.parameters(), 1e-3, warmup_steps=100)
    step = 0
    while True:
        index = torch.randint(len(pixels), (batch,), generator=generator)
        loss = decoder.loss(pixels[index].to(device), tokens[index].to(device), generator=generator)
        update(loss)
        step += 1
        yield step, loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder: its CLIP encoder, pixel decoder and DiT config")
    parser.add_argument("--components", type=int, default=16, help="principal components per token (0: all)")
    parser.add_argument(
        "--condition",
        choices=("scene", "model"),
        default="scene",
        help="scene: the exact scene encoding; model: the saved model's frozen backbone + queries on each "
        "scene's caption (10%% short, as stage 2) and on the prompt text, for comparison",
    )
    parser.add_argument("--scenes", type=int, default=20_000, help="training renders (world seed 0)")
    parser.add_argument("--dim", type=int, help="DiT width (default: the model's)")
    parser.add_argument("--layers", type=int, help="DiT layers (default: the model's)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--minutes", type=float, help="also stop after this much training time")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between judged samplings")
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--sample-steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument("--decoder-steps", type=int, help="pixel decoder steps (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the DiT (GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write sample grids and a JSON-lines log here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = Blip3o.from_pretrained(args.model).to(device).eval()

    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.scenes)]
    started = time.perf_counter()
    targets, cut = encode_targets(model, [render(s) for s in scenes], args.components)  # (N, K, g, g)
    condition = SceneCondition(model.config.dit.latent_embedding_size, model.config.clip.image_size)
    records = [r for _, r in balanced_subset(load_eval_prompts(), args.prompts)]
    prompt_rng = np.random.default_rng(5)
    if args.condition == "scene":
        conditions = torch.stack([condition(s) for s in scenes]).to(device)  # (N, 9, H)
        prompt_conditions = torch.stack([condition(scene_for_prompt(r, prompt_rng)) for r in records]).to(
            device
        )
    else:
        conditions = caption_conditions(model, scenes, rng)  # (N, Q, H)
        prompt_conditions = model_conditions(model, [r["prompt"] for r in records])  # (P, Q, H)
    print(
        f"{args.scenes} targets {tuple(targets.shape[1:])} and conditions in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    base = model.config.dit
    dit_config = replace(
        base, in_channels=targets.shape[1], dim=args.dim or base.dim, n_layers=args.layers or base.n_layers
    )
    dit = DiT(dit_config).to(device)
    print(f"DiT {dit.num_params():,} params; {len(records)} judged prompts at CFG {args.cfg}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def evaluate(step: int, loss: float) -> None:
        dit.eval()
        row = {"step": step, "loss": round(loss, 4)}
        for scale in args.cfg:
            noise = torch.randn(
                (len(records), *targets.shape[1:]), generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                x = model.objective.sample(
                    dit, noise.to(device), prompt_conditions, steps=args.sample_steps, cfg_scale=scale
                )
            images = decode_targets(model, cut, x, args.decoder_steps, seed=0)
            scores = judge_images(images, records)
            row[f"found@{scale:g}"], row[f"geneval@{scale:g}"] = scores["found"], scores["geneval"]
            if args.out:
                title = f"{args.condition} condition, {args.components or 'all'} components, step {step}, CFG {scale:g}"
                grid = image_grid(images, [r["prompt"] for r in records], columns=10, cell=96, title=title)
                grid.save(args.out / f"step_{step:06d}_cfg{scale:g}.png")
        print(json.dumps(row), flush=True)
        if args.out:
            with (args.out / "log.jsonl").open("a") as log:
                log.write(json.dumps(row) + "\n")
        dit.train()

    gen = torch.Generator().manual_seed(args.seed)
    training = dit_training(dit, targets, conditions, model.config.flow, args.lr, args.batch, gen, args.bf16)
    for step, running, train_s in training:
        if step % args.eval_every == 0:
            print(f"step {step}: {step / train_s:.1f} steps/s", flush=True)
            evaluate(step, running)
        if step >= args.steps or (args.minutes is not None and train_s >= 60 * args.minutes):
            break
    if step % args.eval_every:
        evaluate(step, running)


if __name__ == "__main__":
    main()
