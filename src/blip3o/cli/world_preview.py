"""`blip3o world preview`: an HTML page and a PNG grid of ShapesWorld scenes, their language, and the judge.

blip3o world preview --out out/preview [--seed 0] [--n 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip3o world preview",
        description="Render ShapesWorld scenes with captions and QA, and 24 evaluation prompts scored by the judge.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for scenes and the choice of prompts")
    parser.add_argument("--n", type=int, default=16, help="number of random scenes to show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.n < 1:
        print("blip3o world preview: error: --n must be at least 1", file=sys.stderr)
        return 2
    from blip3o.eval.geneval import format_table
    from blip3o.eval.preview import write_preview

    start = time.perf_counter()
    result = write_preview(args.out, seed=args.seed, n_world=args.n)
    print(format_table(result["summary"]))
    print(f"\npage: {result['html']}\ngrid: {result['grid']}\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
