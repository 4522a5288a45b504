"""`blip3o ask`: answer a question about an image (image + text -> text) with a trained model.

    blip3o ask photo.png "what colour is the circle?"
    blip3o ask --batch questions.jsonl --model runs/x/final > answers.jsonl

Without --model, the model bundled with the package is used. A single question prints the answer as plain
text. --batch reads JSON lines {"image": "path.png", "question": "..."} (relative image paths are relative
to the current folder, as `blip3o eval vqa --dump-questions` writes them) and prints one JSON line per
question, in order, with its "answer" added to the input record; so an "id" passes through and the output
can be scored directly with `blip3o eval vqa --answers answers.jsonl`. Images of any size are accepted (the processor resizes them);
transparent images are laid on white, grayscale and palette images converted to RGB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip3o.cli.generate import MODEL_HELP, CliError, check_prompts, load_model, report
from blip3o.world.reasoning import final_answer

if TYPE_CHECKING:
    from PIL import Image

PROG = "blip3o ask"
# Qwen2.5-VL's image processor refuses images more elongated than this (smart_resize raises ValueError).
MAX_ASPECT_RATIO = 200


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", nargs="?", type=Path, help="image file (PNG, JPEG, ...)")
    p.add_argument("question", nargs="?", help="question about the image")
    p.add_argument("--model", type=Path, help=MODEL_HELP)
    p.add_argument("--batch", type=Path, help='JSON-lines file of {"image": ..., "question": ...}')
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="longest reply in tokens, steps included (default 48)"
    )
    p.add_argument(
        "--steps",
        action="store_true",
        help='print the whole reply, with any steps written before the answer ("..., so no"), not only the answer',
    )
    p.add_argument("--batch-size", type=int, default=32, help="questions answered at once (default 32)")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available"
    )
    return p


def load_image(path: Path) -> Image.Image:
    """An RGB image from a file, or CliError saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
                raise CliError(f"image {path} is {image.width}x{image.height}: too elongated to process")
            # A plain convert("RGB") drops alpha and shows whatever colour transparent pixels happen to store
            # (often black); laying the image on white shows it as a viewer would.
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise CliError(f"image {path} does not exist") from err
    except IsADirectoryError as err:
        raise CliError(f"image {path} is a folder, not an image file") from err
    except UnidentifiedImageError as err:
        raise CliError(f"cannot read {path}: not an image file PIL can open") from err
    except (OSError, Image.DecompressionBombError) as err:
        raise CliError(f"cannot read image {path}: {err}") from err


def read_batch(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The --batch records with their line numbers, each with at least a string "image" and "question"."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise CliError(f"cannot read --batch {path}: {err.strerror or err}") from err
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CliError(f"{path}:{lineno}: not JSON ({err.msg})") from err
        if not (
            isinstance(record, dict)
            and isinstance(record.get("image"), str)
            and isinstance(record.get("question"), str)
        ):
            raise CliError(
                f'{path}:{lineno}: expected {{"image": "path", "question": "..."}}, got {line[:80]!r}'
            )
        records.append((lineno, record))
    if not records:
        raise CliError(f"--batch {path} has no questions")
    return records


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.batch is not None and (args.image is not None or args.question is not None):
        parser.error("give either IMAGE QUESTION or --batch FILE, not both")
    if args.batch is None and (args.image is None or args.question is None):
        parser.error("give IMAGE and QUESTION, or --batch FILE")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.batch is None:
        records = [{"image": str(args.image), "question": args.question}]
        images = [load_image(args.image)]
    else:
        numbered = read_batch(args.batch)
        records = [record for _, record in numbered]
        # Every image is read before the model is loaded: a typo on line 900 should not cost a model load.
        images = []
        for lineno, record in numbered:
            try:
                images.append(load_image(Path(record["image"])))
            except CliError as err:
                raise CliError(f"{args.batch}:{lineno}: {err}") from err
    questions = [r["question"] for r in records]

    start = time.perf_counter()
    model = load_model(args.model, args.device)
    check_prompts(model, questions)
    for i in range(0, len(records), args.batch_size):
        answers = model.understand(
            images[i : i + args.batch_size], questions[i : i + args.batch_size], args.max_new_tokens
        )
        for record, reply in zip(records[i : i + args.batch_size], answers, strict=True):
            answer = reply.strip() if args.steps else final_answer(reply.strip())
            print(answer if args.batch is None else json.dumps({**record, "answer": answer}))
    if args.batch is not None:  # stdout is the answers file; the summary goes to stderr
        print(f"answered {len(records)} question(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _run(args, parser)
    except CliError as err:
        return report(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
