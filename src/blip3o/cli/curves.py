"""`blip3o curves`: a run's loss curves as CSV + PNG, optionally over reference curves.

blip3o curves runs/shapes --out runs/shapes/curves
blip3o curves runs/mine --reference docs/reference/shapes_curves.csv --out runs/mine/curves
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip3o curves", description="Plot a training run's loss curves.")
    parser.add_argument("run", type=Path, help="run folder (written by blip3o train)")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/curves)")
    parser.add_argument("--reference", type=Path, help="a curves CSV to overlay (e.g. a recipe's reference)")
    args = parser.parse_args(argv)
    from blip3o.eval.curves import CurvesError, plot, read_csv, read_run, write_csv

    try:
        curves = read_run(args.run)
        reference = read_csv(args.reference) if args.reference else None
    except (CurvesError, OSError, KeyError, ValueError) as err:
        print(f"blip3o curves: error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run / "curves"
    csv_path = write_csv(curves, out / "curves.csv")
    png_path = plot(curves, out / "curves.png", reference, title=str(args.run))
    for stage, records in curves.items():
        print(
            f"{stage:>14}: {len(records)} points, step {records[-1]['step']}, loss {records[-1]['loss']:.4f}"
        )
    print(f"csv: {csv_path}\npng: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
