"""`blip3o eval geneval`: score a GenEval-layout sample folder with the ShapesWorld judge.

    blip3o eval geneval --samples out/geneval_samples [--out out/geneval_scores]

Writes geneval_results.jsonl (one line per image), geneval_scores.json (per-category and overall
accuracy) and geneval_table.txt to --out (default: the samples folder itself, next to the numbered
prompt folders, which readers of the layout skip), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blip3o.eval.geneval import SampleFolderError, read_sample_folder, score_sample_folder, write_results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip3o eval geneval", description="Score a GenEval-layout sample folder with ShapesGenEval."
    )
    parser.add_argument("--samples", type=Path, required=True, help="folder of <index:05d>/ prompt folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the scores (default: --samples)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Validate the layout before loading the judge, so a wrong path fails fast.
        read_sample_folder(args.samples)
    except SampleFolderError as err:
        print(f"blip3o eval geneval: error: {err}", file=sys.stderr)
        return 2
    from blip3o.world.judge import detect  # imported here: the judge is heavier than this command's parsing

    results = score_sample_folder(args.samples, detect, progress=not args.no_progress)
    paths = write_results(results, args.out or args.samples)
    print(results.table)
    print(f"\nscores: {paths['scores']}\nper image: {paths['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
