"""Text only: does the miniature's language model learn a relation answer when the places are written out?

    .venv/bin/python bench/relation_text.py runs/x/vision/model runs/x/data [--task relation] [--steps 3000]
    .venv/bin/python bench/relation_text.py runs/x/vision/model --fresh-scenes 200000 --device cuda --batch 256

No image: each example is text, "pink square bottom left, orange square middle right. is the pink square right
of the orange square? =", and the model (the language model of MODEL, a vision-stage export or its backbone/
folder, so still fresh) is trained on the one word after "=" (cross-entropy over the whole vocabulary, AdamW
lr 1e-3, batch 64), from the run's shards' relation questions (20,000 scenes give 13,562) or from
`--fresh-scenes` newly sampled scenes; every `--eval-every` steps it answers ShapesVQA's 300 relation
questions (the larger of its logits for the task's answer words). Tasks:

  relation        the ShapesVQA answer. Given the places it is an XOR: whether A's place is before B's on the
                  asked axis, flipped by the asked relation; neither alone says anything about yes / no.
  column_order    yes iff A's column is left of B's (first-order: the places alone decide it). A control.
  holds_listed    the ShapesVQA answer, with the relations that hold written before the question ("pink square
                  left of orange square"): a match of the asked relation against that list.
  axis_truth      the relation that holds on the asked axis, one word: left / right (asked left of or right of),
                  above / below, or "with" (level with) where neither holds. First-order: the places decide it.
  truth_then_answer  the ShapesVQA answer, with that true relation written after the question ("... orange
                  square? pink square left of orange square ="): only the match of two written words is left.
  relation_mixed  relation examples ("... =") and axis_truth examples ("... :") in equal parts, scored on
                  relation: does learning where A is against B on each axis make the XOR learnable?

Places are thirds (`object_location`), which decide 0.947 of the relation answers (bench/relation_ceiling.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from blip3o.eval.vqa import vqa_scene, vqa_set
from blip3o.models.backbone import Backbone
from blip3o.train.data import load_shards
from blip3o.world.language import (
    AXIS_ANSWERS,
    COLUMNS,
    named_object,
    object_location,
    questions,
    relation_on_axis,
    relation_phrase,
    relation_question_parts,
)
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import Scene, relations_between

TASKS = ("relation", "column_order", "holds_listed", "axis_truth", "truth_then_answer", "relation_mixed")
# axis_truth's one answer word per truth: world.language.AXIS_ANSWERS, but "with" for "level with", since the
# scoring here reads one logit per word and " level" is three tokens in the miniature's tokenizer.
AXIS_TRUTH_WORD = {**AXIS_ANSWERS, "level with": "with"}


def example(
    question: str, answer: str, scene: Scene, task: str, all_objects: bool = False
) -> tuple[str, str] | None:
    """(text, target word) of one relation question; None for any other question. With `all_objects` the places
    of every object in the scene are written (in the scene's own order), so A and B must be found by name, as
    in an image, where otherwise only theirs are, A first."""
    parts = relation_question_parts(question)
    if parts is None:
        return None
    colour_a, shape_a, asked, colour_b, shape_b = parts
    a, b = named_object(scene, colour_a, shape_a), named_object(scene, colour_b, shape_b)
    (row_a, col_a), (row_b, col_b) = object_location(a, scene.size), object_location(b, scene.size)
    name_a, name_b = f"{colour_a} {shape_a}", f"{colour_b} {shape_b}"
    places = f"{name_a} {row_a} {col_a}, {name_b} {row_b} {col_b}."
    if all_objects:
        places = ", ".join(
            f"{o.color} {o.shape} {' '.join(object_location(o, scene.size))}" for o in scene.objects
        )
        places += "."
    if task == "column_order":
        return f"{places} =", "yes" if COLUMNS.index(col_a) < COLUMNS.index(col_b) else "no"
    if task == "holds_listed":
        holds = relation_phrase(relations_between(a.box, b.box)) or "by"
        return f"{places} {name_a} {holds} {name_b}. {question} =", answer
    truth = relation_on_axis(asked, relations_between(a.box, b.box))
    if task == "axis_truth":
        return f"{places} {question} :", AXIS_TRUTH_WORD[truth]
    if task == "truth_then_answer":
        return f"{places} {question} {name_a} {truth} {name_b} =", answer
    return f"{places} {question} =", answer


def sample_scenes(n: int, seed: int) -> list[tuple[Scene, list[tuple[str, str]]]]:
    """n ShapesWorld scenes and their questions, newly sampled (their own seed: not the shards', not ShapesVQA's)."""
    rng = np.random.default_rng([seed, 7919])
    scenes = [sample_scene(rng) for _ in tqdm(range(n), desc="scenes", mininterval=5)]
    return [(scene, [(qa.question, qa.answer) for qa in questions(scene, rng)]) for scene in scenes]


def training_rows(
    examples: list[tuple[Scene, list[tuple[str, str]]]], task: str, all_objects: bool = False
) -> list[tuple[str, str]]:
    tasks = ("relation", "axis_truth") if task == "relation_mixed" else (task,)
    rows = [example(q, a, scene, t, all_objects) for scene, qa in examples for q, a in qa for t in tasks]
    return [row for row in rows if row is not None]


def single_token(tokenizer, word: str) -> int:
    """The one token of `word`, bare or after a space (the miniature's tokenizer has "yes" bare, " left" spaced)."""
    for text in (word, " " + word):
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            return ids[0]
    raise SystemExit(f"{word!r} is not a single token here, bare or spaced")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", type=Path, help="a vision-stage export or its backbone/ (fresh language model)"
    )
    parser.add_argument("data", type=Path, nargs="?", help="the run's shard folder (or give --fresh-scenes)")
    parser.add_argument("--fresh-scenes", type=int, default=0, help="train on this many newly sampled scenes")
    parser.add_argument("--task", choices=TASKS, default="relation")
    parser.add_argument(
        "--all-objects", action="store_true", help="write every object's place, not only A's and B's"
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.fresh_scenes <= 0):
        parser.error("give either the shard folder or --fresh-scenes N")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone_dir = args.model / "backbone" if (args.model / "backbone").is_dir() else args.model
    backbone = Backbone.from_pretrained(backbone_dir)
    lm, tokenizer = backbone.vlm.to(args.device), backbone.processor.tokenizer
    if args.data is not None:
        examples = [(ex.scene, ex.qa) for ex in load_shards(args.data)[0]]
    else:
        examples = sample_scenes(args.fresh_scenes, seed=1)
    train = training_rows(examples, args.task, args.all_objects)
    test_task = "relation" if args.task == "relation_mixed" else args.task
    test = [
        example(it.question, it.answer, vqa_scene(it.image_index, it.seed), test_task, args.all_objects)
        for it in vqa_set()
    ]
    test = [row for row in test if row is not None]
    words = sorted({answer for _, answer in train + test})
    answer_id = {w: single_token(tokenizer, w) for w in words}
    test_words = sorted({answer for _, answer in test})
    test_ids = torch.tensor([answer_id[w] for w in test_words], device=args.device)  # (W,)
    majority = max(np.mean([a == w for _, a in test]) for w in test_words)
    print(f"{len(train)} training, {len(test)} test examples; answers {test_words}, majority {majority:.3f}")
    print(f"e.g. {train[0][0]!r} -> {train[0][1]}")

    def batch_of(rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = [tokenizer.encode(text) for text, _ in rows]
        width = max(map(len, ids))
        tokens = torch.tensor([[0] * (width - len(i)) + i for i in ids])  # (B, T), left-padded
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        targets = torch.tensor([answer_id[answer] for _, answer in rows])  # (B,)
        return tokens.to(args.device), mask.to(args.device), targets.to(args.device)

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
                said = test_ids[last_logits(tokens, mask)[:, test_ids].argmax(-1)]  # (N,) the likelier answer
            accuracy = (said == targets).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f} | test accuracy {accuracy:.3f} | {time.time() - start:.0f} s",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
