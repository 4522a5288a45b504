"""`blip3o world shards`: write ShapesWorld webdataset shards.

blip3o world shards --n 2000 --out data/shapes --seed 0 --per-shard 1000
"""

from __future__ import annotations

import argparse
import sys
import time

from blip3o.data.shards import write_shards
from blip3o.eval.vqa import VQA_SEED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip3o world shards", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output directory (created if needed)")
    p.add_argument("--seed", type=int, default=0, help=f"world seed (any but {VQA_SEED}, the ShapesVQA seed)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.seed == VQA_SEED:
        # Same seed, same scenes: training on these would train on the held-out ShapesVQA images.
        print(
            f"blip3o world shards: seed {VQA_SEED} is reserved for the ShapesVQA held-out set",
            file=sys.stderr,
        )
        return 2
    if args.n < 1 or args.per_shard < 1:
        print("blip3o world shards: --n and --per-shard must be positive", file=sys.stderr)
        return 2
    start = time.perf_counter()
    manifest = write_shards(args.out, args.n, args.seed, args.per_shard, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(
        f"wrote {manifest['n']} samples (seed {manifest['seed']}) in {len(manifest['shards'])} shards "
        f"to {args.out} in {seconds:.1f} s ({manifest['n'] / seconds:.0f} samples/s); manifest.json lists them"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
