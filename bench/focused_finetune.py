"""Can the model's language model learn one kind of ShapesVQA question at all? A focused stage-1 fine-tune.

    .venv/bin/python bench/focused_finetune.py MODEL [--kinds relation] [--share 0.5] [--steps 2000]
        [--location-share 0] [--lr 1e-3] [--train-vision] [--out DIR]

Why: on the bundled model relation questions sit at chance (0.49) and the language model answers "no" to
nearly all of them. This asks whether that is the training mix (relation is one kind in seven, among captions)
or the model: it fine-tunes the model's language model (vision tower frozen unless `--train-vision`, as in the
recipe's stage 1) on batches in which a `--share` of the samples are questions of `--kinds` and the rest other
question kinds, from `--scenes` fresh ShapesWorld renders (world seed 0, the recipe's), and scores the full
ShapesVQA set before and after: accuracy per kind and the most common answers to the focused kinds (a model
that answers one word to every question of a kind has learned only its prior).

`--location-share` adds a question ShapesVQA does not ask, "where is the <colour> <shape>?" answered with the
object's row and column in thirds ("top left"): direct practice at finding an object and reading where it is,
which relation questions need twice (and which the recipe's captions teach too weakly: bench/caption_locations.py).

Figures: README, "Where it fails" (understanding).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch

from blip3o.eval.model_eval import vqa_with_model
from blip3o.eval.vqa import VQA_QUESTIONS, vqa_set
from blip3o.models.blip3o import Blip3o
from blip3o.train.optim import build_optimizer
from blip3o.train.stages import parameters_of, set_trainable
from blip3o.world.language import QA_KINDS, annotate, location_questions
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


def question_pools(scenes: int, kinds: set[str]) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(image, question, answer) of every question the renders' annotations hold, split into those of `kinds`
    and the rest, and the renders' where-questions (`location_questions`; a training-only kind that ShapesVQA
    does not ask), all from one pass over the renders."""
    rng = np.random.default_rng(0)
    focused, other, located = [], [], []
    for _ in range(scenes):
        scene = sample_scene(rng)
        image, notes = render(scene), annotate(scene, rng)
        for qa in notes.qa:
            (focused if qa.kind in kinds else other).append((image, qa.question, qa.answer))
        located += [(image, qa.question, qa.answer) for qa in location_questions(scene)]
    return focused, other, located


def scores(model: Blip3o, focused: dict[str, str], n_questions: int) -> dict:
    """ShapesVQA per kind, and the five most common answers to each focused kind (`focused`: question id ->
    kind, for the questions of the focused kinds in the `n_questions` set)."""
    result = vqa_with_model(model, n_questions=n_questions)
    by_kind = collections.defaultdict(collections.Counter)
    for question_id, kind in focused.items():
        by_kind[kind][result["answers"][question_id]] += 1
    return {
        "overall": round(result["overall"]["mean"], 3),
        "per_kind": {k: round(v["mean"], 3) for k, v in result["per_kind"].items()},
        "answers": {k: counter.most_common(5) for k, counter in by_kind.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--kinds", nargs="+", default=["relation"], choices=QA_KINDS)
    parser.add_argument("--share", type=float, default=0.5, help="share of each batch from --kinds")
    parser.add_argument(
        "--location-share", type=float, default=0.0, help='share of "where is the <object>?" questions'
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scenes", type=int, default=20_000, help="training renders (world seed 0)")
    parser.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    parser.add_argument("--questions", type=int, default=VQA_QUESTIONS, help="ShapesVQA set size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the two score rows (JSON lines) and the model here")
    args = parser.parse_args(argv)
    if not (args.share >= 0.0 and args.location_share >= 0.0 and args.share + args.location_share <= 1.0):
        parser.error(
            f"--share and --location-share must be >= 0 and sum to at most 1: {args.share}, {args.location_share}"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kinds = set(args.kinds)
    model = Blip3o.from_pretrained(args.model)

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            with (args.out / "log.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    focused, other, located = question_pools(args.scenes, kinds)
    if not focused or not other:
        raise SystemExit(f"{args.scenes} scenes hold {len(focused)} focused and {len(other)} other questions")
    asked = {item.id: item.kind for item in vqa_set(args.questions) if item.kind in kinds}
    log({"step": 0, "focused_questions": len(focused), **scores(model, asked, args.questions)})

    set_trainable(model, "understanding", freeze_vision=not args.train_vision)
    named = list(parameters_of(model))
    trainable = [p for _, p in named]
    optimizer = build_optimizer(named, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(1)
    model.train()
    running, start = None, time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = []
        for _ in range(args.batch):
            draw = rng.random()
            if draw < args.location_share:
                batch.append(located[rng.integers(len(located))])
            elif draw < args.location_share + args.share:
                batch.append(focused[rng.integers(len(focused))])
            else:
                batch.append(other[rng.integers(len(other))])
        images, questions, answers = zip(*batch, strict=True)
        loss = model.backbone.understanding_loss(list(images), list(questions), list(answers))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0:
            print(
                f"step {step}: loss {running:.4f}, {step / (time.perf_counter() - start):.1f} steps/s",
                flush=True,
            )
    model.eval()
    log({"step": args.steps, "loss": round(running, 4), **scores(model, asked, args.questions)})
    if args.out:
        model.save_pretrained(args.out / "model")


if __name__ == "__main__":
    main()
