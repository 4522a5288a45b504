"""Stage-0 component speed: training-step time of CLIP, the pixel decoder and the VAE, and decoder sampling time.

    .venv/bin/python bench/stage0_components.py                 # tiny presets, one thread
    .venv/bin/python bench/stage0_components.py --threads 2 --repeats 5

Each training step is forward + backward + AdamW on a fixed batch of ShapesWorld renders (CLIP batch 64 with
short and with long captions, decoder and VAE batch 32); sampling is 16 images at 20 Euler steps with CFG
(one UNet call of batch 32 per step). Prints the median wall-clock and CPU time of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from blip3o.data.tokenizer import shapes_corpus, train_tokenizer
from blip3o.models.clip import ClipEncoder, clip_config
from blip3o.models.decoder import PixelDecoder, decoder_config, images_to_tensor
from blip3o.models.vae import Vae, vae_config
from blip3o.world.language import annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds per call. On a shared machine wall time includes waiting for a core;
    CPU time (this process, all threads) is what the work itself costs."""
    fn()  # warm-up: allocator, kernel selection
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def train_step(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(64)]
    images = [render(s) for s in scenes]
    annotations = [annotate(s, rng) for s in scenes]
    tokenizer = train_tokenizer(shapes_corpus(200), vocab_size=512)

    clip = ClipEncoder(clip_config("tiny", text_vocab_size=len(tokenizer)))
    pixels = clip.preprocess(images)  # (64, 3, 64, 64)
    results: dict[str, tuple[float, float]] = {}
    for kind in ("short_caption", "long_caption"):
        text = tokenizer([getattr(a, kind) for a in annotations], padding=True, return_tensors="pt")
        step = train_step(
            clip, lambda t=text: clip.contrastive_loss(pixels, t["input_ids"], t["attention_mask"])
        )
        length = text["input_ids"].shape[1]
        results[f"clip tiny, batch 64, {kind} (padded to {length} tokens)"] = median_seconds(
            step, args.repeats
        )

    decoder = PixelDecoder(decoder_config("tiny"))
    targets = images_to_tensor(images[:32])  # (32, 3, 64, 64)
    features = torch.randn(32, 64, 128)
    step = train_step(decoder, lambda: decoder.loss(targets, features, torch.Generator().manual_seed(0)))
    results["decoder tiny, batch 32"] = median_seconds(step, args.repeats)

    vae = Vae(vae_config("tiny"))
    step = train_step(vae, lambda: vae.loss(targets, torch.Generator().manual_seed(0)))
    results["vae tiny, batch 32"] = median_seconds(step, args.repeats)

    decoder.eval()
    sample = lambda: decoder.decode(features[:16], steps=20, cfg_scale=3.0, generator=torch.Generator())  # noqa: E731
    results["decoder tiny sampling, 16 images, 20 steps, CFG"] = median_seconds(
        sample, max(1, args.repeats // 2)
    )

    params = {
        "clip": sum(p.numel() for p in clip.parameters()),
        "decoder": sum(p.numel() for p in decoder.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
    }
    print(f"threads={args.threads}  params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))
    print(f"{'':<60s} {'wall':>8s} {'cpu':>8s}")
    for name, (wall, cpu) in results.items():
        print(f"{name:<60s} {wall:7.3f}s {cpu:7.3f}s")


if __name__ == "__main__":
    main()
