"""`blip3o demo`: the model at both of its jobs in about a minute, with a picture, a page and a table.

    blip3o demo                                  # the bundled model, into out/demo/
    blip3o demo --model runs/x/final --out out/demo_x --seed 1 --steps 10
    blip3o demo --self-check 1                   # one plain sample per prompt

Generates one image for each of 16 ShapesGenEval prompts (3 or 2 per category, the same every run) in one
batch, by default each the model's self-checked pick (up to 4 samples, the first it believes with probability
>= 0.25: 25 s here against 16 s for one sample, 13 of 16 prompts passed against 9), and judges them with
GenEval's rules; asks 16 questions about 8 fresh ShapesWorld scenes and scores the answers as ShapesVQA does.
Writes grid.png (the images, PASS/FAIL under each), report.html (one self-contained page: every image, prompt,
question and answer) and summary.json to --out, and prints the scores. 16 prompts and 16 questions are a look
at the model, not benchmark scores (`blip3o eval geneval`, `blip3o eval vqa`). The same model, seed and
options give the same images and answers.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from blip3o.cli.generate import (
    COUNT_GUIDANCE_HELP,
    MODEL_HELP,
    CliError,
    check_accept,
    check_count_guidance,
    default_model,
    load_model,
    report,
    writable_file,
)

PROG = "blip3o demo"
# The demo's sampler when --self-check is not given: what ShapesGenEval scored 0.837 +- 0.008 against one
# sample's 0.750 +- 0.005 (3 seeds; README), P chosen on bench/best_of_k.py's rows before that run.
DEFAULT_SELF_CHECK, DEFAULT_ACCEPT = 4, 0.25


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, help=MODEL_HELP)
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0, help="image noise and the demo scenes (default 0)")
    p.add_argument("--steps", type=int, help="DiT Euler steps (default: the model's)")
    p.add_argument("--cfg-scale", type=float, help="DiT guidance weight (default: the model's)")
    p.add_argument("--decoder-steps", type=int, help="pixel decoder steps (default: the model's)")
    p.add_argument(
        "--self-check",
        type=int,
        metavar="K",
        help=f"each image the model's self-checked pick of up to K samples (see blip3o generate --self-check; "
        f"default {DEFAULT_SELF_CHECK} with --self-check-accept {DEFAULT_ACCEPT}; 1: one plain sample)",
    )
    p.add_argument(
        "--self-check-accept",
        type=float,
        metavar="P",
        help="with --self-check K: stop at the first candidate the model believes with probability >= P",
    )
    p.add_argument("--count-guidance", type=float, metavar="S", help=COUNT_GUIDANCE_HELP)
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available"
    )
    return p


def _check(args: argparse.Namespace) -> None:
    """Every argument checked before the model is loaded: a typo should cost nothing."""
    if args.self_check is None:  # the default sampler; an explicit K keeps its own --self-check-accept
        args.self_check = DEFAULT_SELF_CHECK
        if args.self_check_accept is None:
            args.self_check_accept = DEFAULT_ACCEPT
    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    for name in ("steps", "decoder_steps", "self_check"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise CliError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    check_accept(args.self_check_accept, args.self_check)
    check_count_guidance(args.count_guidance)
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} is a file; give a folder")
    # blip3o.eval.demo.SUMMARY_FILE, spelled out: importing that module imports torch (about a second).
    writable_file(args.out / "summary.json")


def print_summary(summary: dict, wall_s: float) -> None:
    """The scores as a table on the terminal (rich), then what was written where."""
    from rich.console import Console
    from rich.table import Table

    from blip3o.eval.demo import timing_text

    gen, vqa = summary["geneval"], summary["vqa"]
    table = Table(title=f"blip3o demo: {summary['model']} (seed {summary['seed']})")
    for column, justify in (("", "left"), ("correct", "right"), ("of", "right"), ("accuracy", "right")):
        table.add_column(column, justify=justify)
    for tag, c in gen["categories"].items():
        table.add_row(f"GenEval {tag}", str(c["correct"]), str(c["images"]), f"{c['accuracy']:.3f}")
    passed = sum(item["correct"] for item in gen["items"])
    table.add_row(
        "GenEval overall",
        str(passed),
        str(gen["images"]),
        f"{gen['overall']:.3f}",
        style="bold",
        end_section=True,
    )
    table.add_row("VQA", str(vqa["correct"]), str(vqa["n"]), f"{vqa['accuracy']:.3f}", style="bold")
    console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line, copyable
    console.print(table)
    console.print("GenEval overall = mean of the category accuracies; " + summary["note"] + ".")
    for name, path in summary["files"].items():
        console.print(f"{name:>8}: {path}")
    console.print(f"{wall_s:.1f} s in all ({timing_text(summary['timing'])})")


def _run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    _check(args)
    path = default_model() if args.model is None else args.model
    model = load_model(path, args.device)
    check_count_guidance(args.count_guidance, model)
    loaded = time.perf_counter()
    from blip3o.eval.demo import run_demo

    summary = run_demo(
        model,
        path,
        args.out,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        decoder_steps=args.decoder_steps,
        load_s=loaded - start,
        self_check=args.self_check,
        self_check_accept=args.self_check_accept,
        count_guidance=args.count_guidance or 0.0,
    )
    print_summary(summary, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except CliError as err:
        return report(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
