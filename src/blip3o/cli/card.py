"""`blip3o card`: a model card (markdown + curves + sample grids + failure examples) from a finished run.

blip3o card runs/shapes --out docs/model
blip3o card runs/shapes --out docs/model --other-geneval runs/shapes_self_checked   # another sampler's scores too
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip3o card", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder written by blip3o train (with its eval/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for MODEL_CARD.md and its figures")
    parser.add_argument("--title", default="blip3o ShapesWorld model")
    parser.add_argument(
        "--other-geneval",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a `blip3o eval geneval --out DIR` of the same model with another sampler, tabled next to the "
        "run's own scores (repeatable)",
    )
    args = parser.parse_args(argv)
    if not (args.run / "config.json").exists():
        print(f"blip3o card: error: {args.run} is not a run folder (no config.json)", file=sys.stderr)
        return 2
    from blip3o.eval.model_card import ModelCardError, build_model_card

    try:
        path = build_model_card(args.run, args.out, title=args.title, other_geneval=tuple(args.other_geneval))
    except (ModelCardError, OSError) as err:
        print(f"blip3o card: error: {err}", file=sys.stderr)
        return 2
    print(f"model card: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
