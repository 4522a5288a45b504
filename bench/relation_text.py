"""Text only: does the miniature's language model learn a relation answer when the places are written out?

    .venv/bin/python bench/relation_text.py runs/x/vision/model runs/x/data [--task relation] [--steps 3000]

No image: each example is text, "pink square bottom left, orange square middle right. is the pink square right
of the orange square? =", and the model (the language model of MODEL, a vision-stage export, so still fresh)
is trained on the one word after "=" (cross-entropy over the whole vocabulary, AdamW lr 1e-3, batch 64), from
the run's shards' relation questions; every `--eval-every` steps it answers ShapesVQA's 300 relation questions
(yes if its "yes" logit beats its "no" logit). Tasks:

  relation        the ShapesVQA answer. Given the places it is an XOR: whether A's place is before B's on the
                  asked axis, flipped by the asked relation; neither alone says anything about yes / no.
  column_order    yes iff A's column is left of B's (first-order: the places alone decide it). A control.
  holds_listed    the ShapesVQA answer, with the relations that hold written before the question ("pink square
                  left of orange square"): a match of the asked relation against that list.

Places are thirds (`object_location`), which decide 0.947 of the relation answers (bench/relation_ceiling.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blip3o.eval.vqa import vqa_scene, vqa_set
from blip3o.models.blip3o import Blip3o
from blip3o.train.data import load_shards
from blip3o.world.language import (
    COLUMNS,
    named_object,
    object_location,
    relation_phrase,
    relation_question_parts,
)
from blip3o.world.scene import Scene, relations_between

TASKS = ("relation", "column_order", "holds_listed")


def example(question: str, answer: str, scene: Scene, task: str) -> tuple[str, str] | None:
    """(text, target word) of one relation question; None for any other question."""
    parts = relation_question_parts(question)
    if parts is None:
        return None
    colour_a, shape_a, _, colour_b, shape_b = parts
    a, b = named_object(scene, colour_a, shape_a), named_object(scene, colour_b, shape_b)
    (row_a, col_a), (row_b, col_b) = object_location(a, scene.size), object_location(b, scene.size)
    name_a, name_b = f"{colour_a} {shape_a}", f"{colour_b} {shape_b}"
    places = f"{name_a} {row_a} {col_a}, {name_b} {row_b} {col_b}."
    if task == "column_order":
        return places, "yes" if COLUMNS.index(col_a) < COLUMNS.index(col_b) else "no"
    if task == "holds_listed":
        holds = relation_phrase(relations_between(a.box, b.box)) or "by"
        return f"{places} {name_a} {holds} {name_b}. {question}", answer
    return f"{places} {question}", answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a vision-stage export (fresh language model)")
    parser.add_argument("data", type=Path, help="the run's shard folder")
    parser.add_argument("--task", choices=TASKS, default="relation")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = Blip3o.from_pretrained(args.model).backbone
    lm, tokenizer = backbone.vlm, backbone.processor.tokenizer
    examples, _ = load_shards(args.data)
    train = [example(q, a, ex.scene, args.task) for ex in examples for q, a in ex.qa]
    train = [row for row in train if row is not None]
    test = [
        example(it.question, it.answer, vqa_scene(it.image_index, it.seed), args.task) for it in vqa_set()
    ]
    test = [row for row in test if row is not None]
    yes, no = tokenizer.encode("yes"), tokenizer.encode("no")
    if len(yes) != 1 or len(no) != 1:
        raise SystemExit(f"'yes' / 'no' are not single tokens here: {yes} / {no}")
    print(
        f"{len(train)} training, {len(test)} test examples (yes share {np.mean([a == 'yes' for _, a in test]):.3f})"
    )
    print(f"e.g. {train[0][0]!r} -> {train[0][1]}")

    def batch_of(rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = [tokenizer.encode(text + " =") for text, _ in rows]
        width = max(map(len, ids))
        tokens = torch.tensor([[0] * (width - len(i)) + i for i in ids])  # (B, T), left-padded
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        targets = torch.tensor([yes[0] if answer == "yes" else no[0] for _, answer in rows])  # (B,)
        return tokens, mask, targets

    def last_logits(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding does not shift a row
        out = lm(input_ids=tokens, attention_mask=mask, position_ids=positions[None].expand(3, -1, -1))
        return out.logits[:, -1]  # (B, V)

    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.0)
    rng, start = np.random.default_rng(0), time.time()
    for step in range(1, args.steps + 1):
        lm.train()
        tokens, mask, targets = batch_of([train[i] for i in rng.integers(len(train), size=args.batch)])
        loss = F.cross_entropy(last_logits(tokens, mask), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0:
            lm.eval()
            with torch.no_grad():
                tokens, mask, targets = batch_of(test)
                logits = last_logits(tokens, mask)
            said_yes = logits[:, yes[0]] > logits[:, no[0]]
            accuracy = (said_yes == (targets == yes[0])).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f} | test accuracy {accuracy:.3f} | {time.time() - start:.0f} s",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
