"""`blip3o study`: the paper's design study on ShapesWorld, every variant on the same wall-time budget.

    blip3o study --budget-minutes 15 --out runs/study                       # all four variants
    blip3o study --budget-minutes 5 --out out/study_smoke --variants clip_fm clip_mse --points 2

Variants: clip_fm (CLIP + flow matching, BLIP3-o), clip_mse (CLIP + MSE regression), vae_fm (VAE + flow
matching; its VAE trains first for --vae-minutes, outside the budget), joint (CLIP + flow matching with the
backbone unfrozen and the understanding loss mixed in). Each starts from the base model's CLIP, pixel decoder
and backbone with a fresh DiT and fresh queries. Writes <out>/report.md, <out>/results.json and PNG plots.
Run the same command again to resume.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from blip3o.study.config import VARIANTS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip3o study", description="Train the paper's generation designs on equal terms and report."
    )
    parser.add_argument("--budget-minutes", type=float, required=True, help="training minutes per variant")
    parser.add_argument("--out", type=Path, required=True, help="study folder (created; reused to resume)")
    parser.add_argument("--base", help="model folder supplying CLIP, decoder and backbone (default: bundled)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"which variants (default: all): {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--points", type=int, default=4, help="measurements per variant (default 4)")
    parser.add_argument("--vae-minutes", type=float, help="vae_fm's VAE training (default max(3, budget/3))")
    parser.add_argument("--vae-preset", default="tiny", help="VAE preset (tiny: 256 latent tokens)")
    parser.add_argument("--geneval-prompts", type=int, default=60, help="ShapesGenEval prompts (balanced)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--vqa-questions", type=int, default=300)
    parser.add_argument("--diversity-prompts", type=int, default=4, help="prompts for the diversity metric")
    parser.add_argument("--sample-steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument("--decoder-steps", type=int, help="pixel-decoder steps (default: the model's)")
    parser.add_argument("--num-samples", type=int, default=20_000, help="ShapesWorld samples to write")
    parser.add_argument("--shards", help="existing ShapesWorld shards to use instead of writing them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from blip3o.bundled import NoBundledModelError, bundled_model_dir
    from blip3o.models.blip3o import ModelLoadError
    from blip3o.study.config import StudyConfig, StudyError
    from blip3o.train.checkpoint import CheckpointError
    from blip3o.train.data import DataError

    def fail(message: str) -> int:
        print(f"blip3o study: error: {message}", file=sys.stderr)
        return 2

    try:
        base = Path(args.base) if args.base else bundled_model_dir()
    except NoBundledModelError as err:
        return fail(str(err))
    if not (base / "config.json").is_file():
        return fail(f"--base {base} is not a blip3o model folder (no config.json)")
    if args.shards and not Path(args.shards).is_dir():
        return fail(f"--shards {args.shards} does not exist (write shards with `blip3o world shards`)")
    vae_minutes = args.vae_minutes if args.vae_minutes is not None else max(3.0, args.budget_minutes / 3)
    try:
        config = StudyConfig(
            budget_minutes=args.budget_minutes, base=str(base.resolve()), variants=tuple(args.variants),
            points=args.points, vae_minutes=vae_minutes, vae_preset=args.vae_preset,
            geneval_prompts=args.geneval_prompts, images_per_prompt=args.images_per_prompt,
            vqa_questions=args.vqa_questions, diversity_prompts=args.diversity_prompts,
            sample_steps=args.sample_steps, decoder_steps=args.decoder_steps, num_samples=args.num_samples,
            shards=str(Path(args.shards).resolve()) if args.shards else "", seed=args.seed,
        )  # fmt: skip
    except StudyError as err:
        return fail(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from blip3o.study.runner import run_study

    command = "blip3o study " + shlex.join(argv)
    try:
        run_study(config, args.out, command, progress=not args.no_progress, device=args.device)
    except (StudyError, DataError, CheckpointError, ModelLoadError) as err:
        return fail(str(err))
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
