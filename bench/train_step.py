"""Speed of the miniature: stage-1 and stage-2 training steps (samples/s) and `generate` latency.

    .venv/bin/python bench/train_step.py                        # CPU, 2 threads
    python bench/train_step.py --device cuda --precision bf16   # a GPU, bf16 autocast
    .venv/bin/python bench/train_step.py --decoders tiny tiny_render tiny_spatial   # decoder presets only

A training step is forward + backward + AdamW update on one process, timed as the median of `--repeats`
steps after `--warmup` steps. `generate` is timed end to end (prompt -> condition -> DiT sampling ->
pixel decoder), split into the DiT part and the decoder part, at batch 1 and 16. `--decoders` instead times
a stage-0 step (flow-matching loss + backward + AdamW) of each named pixel-decoder preset on the same batch, so
their ratios come from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.models.decoder import PixelDecoder, decoder_config
from blip3o.train.optim import build_optimizer
from blip3o.train.stages import StageModule, fit_feature_statistics, parameters_of, set_trainable
from blip3o.world.language import annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    notes = [annotate(s, rng) for s in scenes]
    return {
        "images": [render(s) for s in scenes],
        "captions": [a.long_caption for a in notes],
        "prompts": [a.qa[0].question for a in notes],
        "answers": [a.qa[0].answer for a in notes],
        "seeds": list(range(n)),
    }


def median_step_seconds(loss_fn, optimizer, args, device: torch.device) -> float:
    """Median seconds of a training step (zero_grad, `loss_fn()` under autocast, backward, optimizer step) over
    `args.repeats` steps after `args.warmup`."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = []
    for i in range(args.warmup + args.repeats):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(model: Blip3o, kind: str, batch: dict, args, device: torch.device) -> float:
    """Median seconds per training step of `kind`."""
    set_trainable(model, kind)
    module = StageModule(model, kind)
    optimizer = build_optimizer(parameters_of(model), lr=1e-4, weight_decay=0.0)
    return median_step_seconds(lambda: module(batch)[0], optimizer, args, device)


def time_generate(model: Blip3o, n: int, args, device: torch.device) -> tuple[float, float]:
    """Seconds for the DiT part (prompt -> features) and the decoder part (features -> pixels) of generate."""
    prompts = ["a photo of a red circle left of a blue star"] * n
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with autocast:
        model.generate_target(prompts[:1], steps=2, generator=generator)  # warm-up
        _sync(device)
        start = time.perf_counter()
        target = model.generate_target(prompts, generator=generator)
        _sync(device)
        mid = time.perf_counter()
        model.decode_target(target, generator=generator)
        _sync(device)
    return mid - start, time.perf_counter() - mid


def time_decoder(name: str, args, device: torch.device) -> float:
    """Median seconds per training step of the pixel-decoder preset `name` on random images and features."""
    torch.manual_seed(0)
    decoder = PixelDecoder(decoder_config(name)).to(device)
    config = decoder.config
    optimizer = build_optimizer(decoder.named_parameters(), lr=1e-4, weight_decay=0.0)
    images = torch.rand(args.batch, 3, config.image_size, config.image_size, device=device) * 2 - 1
    features = torch.randn(args.batch, config.num_feature_tokens, config.feature_dim, device=device)
    return median_step_seconds(lambda: decoder.loss(images, features), optimizer, args, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="training batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decoders", nargs="+", metavar="PRESET", help="time these decoder presets only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.decoders:
        print(f"device {device}, precision {args.precision}, threads {args.threads}, batch {args.batch}")
        for name in args.decoders:
            seconds = time_decoder(name, args, device)
            print(f"decoder {name:<14} {seconds * 1e3:8.1f} ms/step  {args.batch / seconds:8.1f} samples/s")
        return

    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=500), seed=0).to(device)
    batch = _batch(args.batch)
    fit_feature_statistics(model, batch["images"])
    print(f"device {device}, precision {args.precision}, threads {args.threads}, batch {args.batch}")
    for kind, label in (("understanding", "stage 1 (understanding)"), ("generation", "stage 2 (generation)")):
        seconds = time_steps(model, kind, batch, args, device)
        print(f"{label:<26} {seconds * 1e3:8.1f} ms/step  {args.batch / seconds:8.1f} samples/s")
    model.eval()
    steps = model.config.flow.sample_steps
    decoder_steps = model.config.decoder.sample_steps
    for n in (1, 16):
        dit_s, dec_s = time_generate(model, n, args, device)
        print(
            f"generate batch {n:>2}: {dit_s + dec_s:7.2f} s  (DiT {steps} steps + CFG: {dit_s:.2f} s, "
            f"pixel decoder {decoder_steps} steps + CFG: {dec_s:.2f} s)"
        )


if __name__ == "__main__":
    main()
