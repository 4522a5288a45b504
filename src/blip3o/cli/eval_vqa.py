"""`blip3o eval vqa`: score answers to the ShapesVQA held-out set, or dump the questions to answer.

    blip3o eval vqa --dump-questions questions.jsonl --images vqa_images/
    blip3o eval vqa --answers answers.jsonl --out scores.json

Answer files are JSON lines: {"id": "shapesvqa-00000", "answer": "red"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip3o eval vqa", description=__doc__.splitlines()[0])
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
    return p


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
    if args.answers is None and args.dump_questions is None:
        parser.error("give --answers to score, or --dump-questions to write the questions")
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
