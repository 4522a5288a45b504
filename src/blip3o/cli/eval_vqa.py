"""`blip3o eval vqa`: ShapesVQA for a model (answer, then score), or score an answer file, or dump the questions.

    blip3o eval vqa --model runs/x/final [--out scores.json] [--n-questions N]
    blip3o eval vqa --dump-questions questions.jsonl --images vqa_images/
    blip3o eval vqa --answers answers.jsonl --out scores.json

With --model, the model answers every question (greedy decoding, batched) and the accuracy per kind and
overall is printed as mean ± std; greedy decoding draws no random numbers, so there is no seed to vary and
the std is 0 (the JSON says so). --out then holds the scores, the settings and every answer by id.
Answer files are JSON lines: {"id": "shapesvqa-00000", "answer": "red"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blip3o.cli.generate import CliError, load_model, report, writable_file
from blip3o.eval.vqa import (
    VQA_QUESTIONS,
    VQAItem,
    format_scores,
    image_filename,
    read_answers,
    score_answers,
    vqa_images,
    vqa_set,
)

PROG = "blip3o eval vqa"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip3o eval vqa", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", type=Path, help="answer the questions with this model folder (e.g. runs/x/final)"
    )
    p.add_argument("--answers", type=Path, help="JSON-lines answer file to score")
    p.add_argument("--out", type=Path, help="write the scores here as JSON")
    p.add_argument("--dump-questions", type=Path, help="write the questions (without answers) as JSON lines")
    p.add_argument("--images", type=Path, help="with --dump-questions: write the images into this folder")
    p.add_argument(
        "--n-questions",
        type=int,
        default=VQA_QUESTIONS,
        help=f"questions in the set (default {VQA_QUESTIONS}, the reported one; another size is another set)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="with --model: questions at once (default 64)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=48,
        help="with --model: longest reply, steps included (default 48)",
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="with --model: default cuda if any"
    )
    p.add_argument("--no-progress", action="store_true", help="with --model: hide the progress bar")
    return p


def _run_model(args: argparse.Namespace) -> None:
    from blip3o.eval.model_eval import format_vqa_summary, vqa_with_model

    for name in ("n_questions", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out is not None:
        writable_file(args.out)  # before the model is loaded
    model = load_model(args.model, args.device)
    result = vqa_with_model(
        model,
        n_questions=args.n_questions,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    print(format_vqa_summary(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nscores and answers: {args.out}")


def _dump(items: list[VQAItem], path: Path, images_dir: Path | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
        for index, image in vqa_images(items).items():
            image.save(images_dir / image_filename(index))
    with open(path, "w") as f:
        for it in items:
            record = it.to_dict(with_answer=False)
            if images_dir is not None:
                record["image"] = str(images_dir / image_filename(it.image_index))
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.model is not None:
        if args.answers is not None or args.dump_questions is not None:
            return report(
                PROG, CliError("--model answers the questions itself: drop --answers/--dump-questions")
            )
        try:
            _run_model(args)
        except CliError as err:
            return report(PROG, err)
        return 0
    if args.answers is None and args.dump_questions is None:
        parser.error("give --model to answer and score, --answers to score, or --dump-questions")
    if args.images is not None and args.dump_questions is None:
        parser.error("--images goes with --dump-questions")
    items = vqa_set(args.n_questions)
    if args.dump_questions is not None:
        _dump(items, args.dump_questions, args.images)
        print(f"wrote {len(items)} questions to {args.dump_questions}")
    if args.answers is not None:
        try:
            answers = read_answers(args.answers)
        except (OSError, ValueError) as exc:
            print(f"blip3o eval vqa: {exc}", file=sys.stderr)
            return 2
        scores = score_answers(items, answers)
        print(format_scores(scores))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
