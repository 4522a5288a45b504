"""Left/right against above/below: where the generation side loses the horizontal relation.

    .venv/bin/python bench/relation_reading.py outcomes EVAL_DIR
    .venv/bin/python bench/relation_reading.py tokens MODEL [--seeds 0 1 2] [--threads 2]
    .venv/bin/python bench/relation_reading.py readout MODEL [--memory queries|prompt-states|prompt-words]
        [--steps 1500] [--lr 2e-4] [--threads 1]

`outcomes`: a ShapesGenEval run's position prompts (EVAL_DIR/seed_*/geneval_results.jsonl, every seed), split
by the relation asked: right, the two objects found but in another relation (same axis and wrong side, or the
other axis), or an object missing. Session 29 found the bundle's vertical relations mostly right and its
horizontal ones at chance (docs/bench/object_target.txt). `tokens`: the same outcomes for the DiT's own tokens,
read by CLIP's object label head as bench/label_judge.py does (no decoder), the 80 position prompts once per seed.

`readout`: can the DiT's condition resampler learn each relation word from what it reads? A copy of MODEL's
resampler and a fresh linear head are trained on the relation loss alone (train/slot_supervision.py's labels:
slot 1 the first object's side, slot 2 the other's) over the frozen backbone's states of the training prompts,
less a fifth of the position prompts held out; per-relation accuracy of slots 1-2 is read on those held-out
prompts and on the evaluation prompts. `--memory` is what the resampler cross-attends to: the 64 query states
(the recipe), with the prompt tokens' last-layer states, or with the prompt tokens' input embeddings
(`BackboneConfig.condition_word_tokens` gives the DiT these; padding masked here).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blip3o.eval.geneval import score_detections
from blip3o.models.blip3o import Blip3o
from blip3o.train.scene_supervision import object_label_detections
from blip3o.train.slot_supervision import UNNAMED, caption_slot_relations
from blip3o.world.prompts import load_eval_prompts, load_train_prompts
from blip3o.world.scene import RELATIONS
from label_judge import read_targets  # bench/ is on sys.path when a bench script runs

MEMORIES = ("queries", "prompt-states", "prompt-words")
REPORT_STEPS = (100, 300, 600, 1000, 1500, 3000)


def classify(prompt: str, correct: bool, reason: str) -> tuple[str, str]:
    """A position prompt's verdict as (relation asked, outcome): right, the two objects found in another relation
    ('same axis, wrong side' or 'other axis'), or 'missing' (an object not found)."""
    asked = next(r for r in RELATIONS if f" {r} " in f" {prompt} ")
    found = re.search(r"found (left of|right of|above|below)$", reason or "")
    if correct:
        return asked, "right"
    if found is None:
        return asked, "missing"
    vertical = {"above", "below"}
    same_axis = (found.group(1) in vertical) == (asked in vertical)
    return asked, "same axis, wrong side" if same_axis else "other axis"


def relation_outcomes(eval_dir: Path) -> dict[str, Counter]:
    """Per relation asked, a count of each outcome (`classify`) over every seed of a ShapesGenEval run."""
    files = sorted(eval_dir.glob("seed_*/geneval_results.jsonl"))
    if not files:
        raise FileNotFoundError(f"no seed_*/geneval_results.jsonl under {eval_dir}")
    outcomes = {relation: Counter() for relation in RELATIONS}
    for path in files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["tag"] == "position":
                asked, outcome = classify(record["prompt"], record["correct"], record["reason"])
                outcomes[asked][outcome] += 1
    return outcomes


@torch.no_grad()
def token_outcomes(model: Blip3o, seeds: list[int], cfg_scale: float = 3.0) -> dict[str, Counter]:
    """The same, for the DiT's own tokens read by CLIP's object label head (bench/label_judge.py's judge), one
    sample per evaluation position prompt and seed."""
    records = [r for r in load_eval_prompts() if r["tag"] == "position"]
    outcomes = {relation: Counter() for relation in RELATIONS}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        target = model.generate_target(
            [r["prompt"] for r in records], cfg_scale=cfg_scale, generator=generator
        )
        for record, reading in zip(records, read_targets(model, target), strict=True):
            correct, reason = score_detections(record, object_label_detections(reading))
            asked, outcome = classify(record["prompt"], correct, reason)
            outcomes[asked][outcome] += 1
    return outcomes


def print_outcomes(outcomes: dict[str, Counter]) -> dict:
    for relation, counts in outcomes.items():
        total = sum(counts.values())
        print(f"{relation:9s} {total:4d} images: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return {r: dict(c) for r, c in outcomes.items()}


@torch.no_grad()
def memories(
    model: Blip3o, prompts: list[str], memory: str, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the resampler reads for each prompt: (P, M, H) and a (P, M) padding mask (True = ignore)."""
    backbone = model.backbone
    n_queries = backbone.config.n_queries
    embed = backbone.vlm.model.language_model.embed_tokens
    states, masks = [], []
    for start in range(0, len(prompts), batch):
        inputs = backbone.generation_inputs(prompts[start : start + batch])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]  # (B, T)
        hidden = backbone.generation_hidden_states(ids, mask).float()  # (B, T, H)
        if memory == "prompt-words":
            hidden = torch.cat(
                [embed(ids[:, :-n_queries]).float(), hidden[:, -n_queries:]], dim=1
            )  # (B, T, H)
        if memory == "queries":
            hidden, mask = hidden[:, -n_queries:], mask[:, -n_queries:]  # (B, Q, H), (B, Q)
        states.append(hidden)
        masks.append(mask == 0)
    width = max(s.shape[1] for s in states)  # left-pad every batch to the longest
    states = [nn.functional.pad(s, (0, 0, width - s.shape[1], 0)) for s in states]
    masks = [nn.functional.pad(m, (width - m.shape[1], 0), value=True) for m in masks]
    return torch.cat(states), torch.cat(masks)


def split_prompts(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Training prompts less a fifth of their position prompts (held out), those held out, the eval's."""
    train = [r["prompt"] for r in load_train_prompts()]
    position = [p for p in train if any(f" {r} " in f" {p} " for r in RELATIONS)]
    held = sorted(np.random.default_rng(seed).choice(position, len(position) // 5, replace=False).tolist())
    kept = [p for p in train if p not in set(held)]
    evaluation = [r["prompt"] for r in load_eval_prompts() if r["tag"] == "position"]
    return kept, held, evaluation


def readout(model: Blip3o, memory: str, steps: int, lr: float, seed: int = 0) -> list[dict]:
    """Train a copy of the resampler + a relation head; per-relation slot accuracy at REPORT_STEPS."""
    if model.dit.resampler is None:
        raise ValueError("this model's DiT has no condition resampler (DiTConfig.condition_slots = 0)")
    torch.manual_seed(seed)
    slots = model.dit.config.condition_slots
    sets = {}
    for name, prompts in zip(("train", "held", "eval"), split_prompts(seed), strict=True):
        states, ignore = memories(model, prompts, memory)
        labels = torch.stack([caption_slot_relations(p, slots) for p in prompts])  # (P, S)
        sets[name] = (states, ignore, labels)
    resampler = copy.deepcopy(model.dit.resampler).float().train()
    head = nn.Linear(resampler.slots.shape[-1], len(RELATIONS) + 1)
    optimizer = torch.optim.AdamW([*resampler.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    states, ignore, labels = sets["train"]
    rows = []
    for step in range(1, steps + 1):
        pick = torch.randint(len(labels), (64,))
        logits = head(resampler(states[pick], ignore[pick]))  # (64, S, R + 1)
        named = labels[pick] != UNNAMED
        loss = nn.functional.cross_entropy(logits[named], labels[pick][named])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in REPORT_STEPS or step == steps:
            row = {"step": step, "loss": round(loss.item(), 4)}
            with torch.no_grad():
                for name in ("held", "eval"):
                    s, i, y = sets[name]
                    predicted = head(resampler(s, i)).argmax(-1)[:, :2]  # (P, 2)
                    for k, relation in enumerate(RELATIONS):
                        asked = y[:, :2] == k
                        row[f"{name} {relation}"] = round(float((predicted[asked] == k).float().mean()), 3)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    out = sub.add_parser("outcomes", help="a ShapesGenEval run's position prompts, by relation")
    out.add_argument("eval_dir", type=Path)
    tokens = sub.add_parser("tokens", help="the same outcomes for the DiT's tokens (CFG 3), no decoder")
    tokens.add_argument("model", type=Path)
    tokens.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tokens.add_argument("--threads", type=int, default=2)
    read = sub.add_parser("readout", help="train a resampler copy on the relation loss alone")
    read.add_argument("model", type=Path)
    read.add_argument("--memory", choices=MEMORIES, default="queries")
    read.add_argument("--steps", type=int, default=1500)
    read.add_argument("--lr", type=float, default=2e-4)
    read.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "outcomes":
        return print_outcomes(relation_outcomes(args.eval_dir))
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    if args.command == "tokens":
        return print_outcomes(token_outcomes(model, args.seeds))
    rows = readout(model, args.memory, args.steps, args.lr)
    for row in rows:
        print(json.dumps(row))
    return {"memory": args.memory, "rows": rows}


if __name__ == "__main__":
    main()
