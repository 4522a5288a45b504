"""`blip3o train`: run a preset's stages, one process or many (torchrun), resumable.

    blip3o train --preset tiny-test --out runs/tiny                      # CPU, seconds
    blip3o train --preset shapes --out runs/shapes stages.generation.steps=500 precision=bf16
    torchrun --nproc_per_node 2 -m blip3o.cli.train --preset tiny-test --out runs/ddp distributed=ddp

Overrides are `dotted.key=value`; stages are addressed by name (`stages.<name>.<field>=...`, or
`stages.*.<field>=...` for all); a tuple is comma-separated (`model.clip.patch_label_groups=6,9`). They are
applied together, so fields only valid together can be given together (`model.clip.target_components=19
model.dit.in_channels=19`). Run the same command again to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o train", description="Train BLIP3-o stage by stage.")
    parser.add_argument("--preset", help="named run configuration (see --list)")
    parser.add_argument("--out", type=Path, help="run folder (created; reused to resume)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="log lines only, no progress bars")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    from blip3o.train.config import ConfigError
    from blip3o.train.overrides import apply_overrides
    from blip3o.train.presets import PRESETS, preset

    if args.list:
        print("\n".join(sorted(PRESETS)))
        return 0
    if not args.preset or not args.out:
        parser.error("--preset and --out are required")

    try:
        config = apply_overrides(preset(args.preset), args.overrides)
    except ConfigError as err:
        print(f"blip3o train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_json())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from blip3o.models.blip3o import ModelLoadError
    from blip3o.train.checkpoint import CheckpointError
    from blip3o.train.data import DataError
    from blip3o.train.loop import run

    try:
        results = run(config, args.out, progress=not args.no_progress, device=args.device)
    except (ConfigError, DataError, CheckpointError, ModelLoadError) as err:
        print(f"blip3o train: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one summary is enough
        return 0
    for r in results:
        loss = "n/a" if r.final_loss is None else f"{r.final_loss:.4f}"
        print(f"{r.name:>14}: {r.steps_run} steps, final loss {loss}, {r.seconds:.1f} s -> {r.model_dir}")
    print(f"model: {Path(args.out) / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
