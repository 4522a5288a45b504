"""ShapesWorld throughput: how fast this machine writes shards (and, per stage, where the time goes), and
how fast the judge scores images.

    .venv/bin/python bench/world_throughput.py            # 2,000 samples, one process
    .venv/bin/python bench/world_throughput.py --n 500

Each figure is one measurement on one core; shard writing is per-shard independent, so it scales with
processes running `write_shard` on different shards.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from blip3o.data.shards import write_shards
from blip3o.world.language import annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


def bench_shards(n: int = 2000, samples_per_shard: int = 1000, seed: int = 0) -> dict[str, float]:
    """Write `n` samples to a temporary directory; returns samples/s and MB/s of shard output."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_shards(tmp, n, seed, samples_per_shard, progress=False)
        seconds = time.perf_counter() - start
        megabytes = sum(p.stat().st_size for p in Path(tmp).glob("*.tar")) / 1e6
    return {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "mb_per_s": megabytes / seconds}


def bench_sample_stages(n: int = 500, seed: int = 0) -> dict[str, float]:
    """Milliseconds per sample spent sampling the scene, annotating it, rendering and PNG-encoding."""
    totals = dict.fromkeys(("sample", "annotate", "render", "png"), 0.0)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        t0 = time.perf_counter()
        scene = sample_scene(rng)
        t1 = time.perf_counter()
        annotate(scene, rng)
        t2 = time.perf_counter()
        image = render(scene)
        t3 = time.perf_counter()
        image.save(io.BytesIO(), format="png")
        t4 = time.perf_counter()
        for stage, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[stage] += dt
    return {stage: 1e3 * t / n for stage, t in totals.items()}


def bench_judge(n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Judge speed: images/s for `detect` on pre-rendered random scenes (rendering not timed)."""
    from blip3o.world.judge import detect

    rng = np.random.default_rng(seed)
    images = [render(sample_scene(rng)) for _ in range(n)]
    detect(images[0])  # warm-up (loads the shape model)
    start = time.perf_counter()
    for image in images:
        detect(image)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="ShapesWorld throughput on this machine")
    p.add_argument("--n", type=int, default=2000, help="samples to write (default 2000)")
    args = p.parse_args(argv)
    shards = bench_shards(args.n)
    print(
        f"shard writing: {shards['samples']} samples in {shards['seconds']:.2f} s = "
        f"{shards['samples_per_s']:.0f} samples/s ({shards['mb_per_s']:.1f} MB/s)"
    )
    stages = bench_sample_stages(min(args.n, 500))
    print("per sample: " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items()))
    judge = bench_judge(min(args.n, 1000))
    print(
        f"judge: {judge['images']} images in {judge['seconds']:.2f} s = {judge['images_per_s']:.0f} images/s"
    )


if __name__ == "__main__":
    main()
