"""`blip3o eval geneval`: ShapesGenEval for a model (generate, then score), or for a folder of samples.

    blip3o eval geneval --model runs/x/final --out out/geneval [--seeds 0,1,2] [--steps K] [--cfg-scale W]
        [--decoder-steps K] [--decoder-candidates K] [--max-prompts N]
    blip3o eval geneval --samples out/geneval_samples [--out out/geneval_scores]

With --model: for each seed, generates every evaluation prompt's images into <out>/seed_<s>/ in GenEval's
sample layout, scores them with the ShapesWorld judge (<out>/seed_<s>/geneval_scores.json, ...), and writes
the mean ± std over seeds to <out>/geneval_summary.json and <out>/geneval_summary.txt, which it prints.
--max-prompts evaluates a subset balanced across the six categories, for quick looks; its score is not the
benchmark's, and the table says so. The same model, seeds and options give the same images.

With --samples: scores an existing folder. Writes geneval_results.jsonl (one line per image),
geneval_scores.json (per-category and overall accuracy) and geneval_table.txt to --out (default: the
samples folder itself, next to the numbered prompt folders, which readers of the layout skip), and prints
the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from blip3o.cli.generate import (
    COUNT_GUIDANCE_HELP,
    DECODER_CANDIDATES_HELP,
    GUIDANCE_INTERVAL_HELP,
    CliError,
    check_accept,
    check_count_guidance,
    load_model,
    parse_guidance_interval,
    report,
)
from blip3o.eval.geneval import SampleFolderError, read_sample_folder, score_sample_folder, write_results

PROG = "blip3o eval geneval"
# Options that only make sense when generating with --model (argparse dest names).
MODEL_ONLY = (
    "seeds",
    "steps",
    "cfg_scale",
    "cfg_interval",
    "decoder_steps",
    "decoder_cfg_scale",
    "decoder_candidates",
    "max_prompts",
    "batch_size",
    "self_check",
    "self_check_accept",
    "count_guidance",
    "resume",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--samples", type=Path, metavar="DIR", help="score this folder of <index:05d>/ prompt folders"
    )
    parser.add_argument(
        "--model", type=Path, metavar="PATH", help="generate with this model folder (e.g. runs/x/final)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (required with --model; default: --samples)",
    )
    parser.add_argument(
        "--seeds", metavar="LIST", help="comma-separated sampling seeds, e.g. 0,1,2 (default 0)"
    )
    parser.add_argument("--steps", type=int, metavar="K", help="DiT Euler steps (default: the model's)")
    parser.add_argument(
        "--cfg-scale", type=float, metavar="W", help="DiT guidance weight (default: the model's)"
    )
    parser.add_argument("--cfg-interval", metavar="MIN,MAX[,OUTSIDE]", help=GUIDANCE_INTERVAL_HELP)
    parser.add_argument(
        "--decoder-steps", type=int, metavar="K", help="pixel decoder steps (default: the model's)"
    )
    parser.add_argument("--decoder-cfg-scale", type=float, metavar="W", help="pixel decoder guidance weight")
    parser.add_argument("--decoder-candidates", type=int, metavar="K", help=DECODER_CANDIDATES_HELP)
    parser.add_argument("--count-guidance", type=float, metavar="S", help=COUNT_GUIDANCE_HELP)
    parser.add_argument(
        "--max-prompts",
        type=int,
        metavar="N",
        help="evaluate this many prompts, balanced across categories (a subset)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="images per generate call (default 64; the images depend on it)",
    )
    parser.add_argument(
        "--self-check",
        type=int,
        metavar="K",
        help="each image is the best of K samples by the model's own check of its prompt (K times the "
        "sampling; see blip3o generate --self-check; default 1: off)",
    )
    parser.add_argument(
        "--self-check-accept",
        type=float,
        metavar="P",
        help="with --self-check K: stop drawing an image's candidates at the first the model believes "
        "(see blip3o generate --self-check-accept; default: always K)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        default=None,  # None when absent, so that --samples can tell it was not given
        help="continue a killed run in --out with the same options: finished prompts are kept, and the images "
        "are those an uninterrupted run makes",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; CliError for anything else (empty items, negatives, repeats)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):  # isdigit: no sign, so no negative seeds
        raise CliError(f"--seeds must be comma-separated integers >= 0 such as 0,1,2, got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise CliError(f"--seeds repeats a seed: {text!r} (each seed gets its own folder)")
    return seeds


def _check_model_args(args: argparse.Namespace) -> list[int]:
    if args.out is None:
        raise CliError("--model needs --out DIR: the folder for the samples and scores")
    for name in ("steps", "decoder_steps", "decoder_candidates", "max_prompts", "batch_size", "self_check"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("cfg_scale", "decoder_cfg_scale"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CliError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    check_accept(args.self_check_accept, args.self_check)
    check_count_guidance(args.count_guidance)
    return parse_seeds(args.seeds if args.seeds is not None else "0")


def _run_model(args: argparse.Namespace) -> None:
    from blip3o.eval.model_eval import (
        DEFAULT_BATCH_SIZE,
        SUMMARY_FILE,
        SUMMARY_TABLE_FILE,
        ResumeError,
        format_summary,
        geneval_with_model,
        refuse_existing_samples,
    )

    seeds = _check_model_args(args)
    interval = parse_guidance_interval(args.cfg_interval) if args.cfg_interval is not None else None
    # Output problems are found before the model is loaded and minutes are spent sampling.
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} is a file; give a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            refuse_existing_samples(args.out, seeds)
    except FileExistsError as err:
        raise CliError(str(err)) from err
    except OSError as err:
        raise CliError(f"cannot write {args.out}: {err.strerror or err}") from err

    model = load_model(args.model, args.device)
    check_count_guidance(args.count_guidance, model)
    if interval is not None:  # the summary reports it (FlowMatchingConfig.guidance_interval)
        model.set_guidance_interval(*interval)
    if args.decoder_candidates is not None:  # the summary reports it (PixelDecoderConfig.sample_candidates)
        model.set_decoder_candidates(args.decoder_candidates)
    try:
        summary = geneval_with_model(
            model,
            args.out,
            seeds=seeds,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            decoder_steps=args.decoder_steps,
            decoder_cfg_scale=args.decoder_cfg_scale,
            max_prompts=args.max_prompts,
            batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
            progress=not args.no_progress,
            self_check=args.self_check or 1,
            self_check_accept=args.self_check_accept,
            count_guidance=args.count_guidance or 0.0,
            resume=bool(args.resume),
        )
    except ResumeError as err:
        raise CliError(str(err)) from err
    except OSError as err:  # e.g. the disk filled up while writing samples
        raise CliError(f"cannot write the samples under {args.out}: {err}") from err
    print(format_summary(summary))
    print(f"\nsummary: {args.out / SUMMARY_FILE}\ntable: {args.out / SUMMARY_TABLE_FILE}")
    print(f"per seed: {args.out}/seed_<s>/ (samples, geneval_scores.json, geneval_results.jsonl)")


def _run_samples(args: argparse.Namespace) -> None:
    given = [name for name in MODEL_ONLY if getattr(args, name) is not None]
    if given:
        raise CliError(f"--{given[0].replace('_', '-')} goes with --model (--samples scores existing images)")
    try:
        # Validate the layout before loading the judge, so a wrong path fails fast.
        read_sample_folder(args.samples)
    except SampleFolderError as err:
        raise CliError(str(err)) from err
    from blip3o.world.judge import detect  # imported here: the judge is heavier than this command's parsing

    results = score_sample_folder(args.samples, detect, progress=not args.no_progress)
    paths = write_results(results, args.out or args.samples)
    print(results.table)
    print(f"\nscores: {paths['scores']}\nper image: {paths['results']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if (args.samples is None) == (args.model is None):
            raise CliError(
                "give --model PATH (generate and score) or --samples DIR (score), not both or none"
            )
        if args.model is not None:
            _run_model(args)
        else:
            _run_samples(args)
    except CliError as err:
        return report(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
