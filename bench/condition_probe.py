"""Does the generation condition say what the prompt asks for? Count, relation and binding, probed.

    .venv/bin/python bench/condition_probe.py MODEL [--threads 2]

Why: on the object-centric bundle the DiT's tokens, read by CLIP's label head (bench/label_judge.py), get
single objects and colours right but counts and positions almost never (counting 0.00, position 0.06 at CFG 3),
while a DiT trained from the exact scene as its condition reached counting 0.47 and position 0.74
(bench/ideal_target.py). So: does the condition (the frozen backbone's last-layer states at the 64 query
positions) carry those facts, or does the DiT have to do without them?

Prompts are the benchmark's templates over every shape, colour and opener (`blip3o.world.prompts`), and four
facts are read from them, each by a ridge one-vs-all probe (fit on a seeded 60%, ridge picked on the next
20%, scored on the last 20%; mean over 3 split seeds). The split is by shapes by default: a count probe is
scored on shapes it was not fit on, an order probe on shape pairs it was not fit on, so it cannot just
remember prompts (`--split prompts` splits the prompts themselves):
- count: "two/three/four ..." in counting prompts (3 classes);
- relation: the relation word of position prompts (4 classes): present in the words themselves;
- subject: which shape a position prompt places ("a circle left of a square" -> circle; 5 classes): needs
  word order, which a bag of words lacks (both shapes are in it);
- first colour: the colour of the first-named object in colour-attribute prompts ("a red circle and a blue
  star" -> red; 8 classes): word order again.
Read from four representations of each prompt: `words` (mean input embedding of the prompt's tokens: a bag of
words, the floor for order facts), `prompt states` (mean of the last-layer states over the prompt's tokens),
`queries mean` (mean of the 64 condition vectors) and `queries` (all 64 concatenated, what the DiT reads).
A fact the words carry but the queries do not is lost on the way into the condition. With the DiT's condition
resampler (`DiTConfig.condition_slots`), two more: `slots` (all slots concatenated, what that DiT reads) and
`slots 1-2` (the first two objects' slots: a position prompt's two objects, whose tokens the DiT would place).
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from blip3o.models.blip3o import Blip3o
from blip3o.world.prompts import (
    COUNTING_NUMBERS,
    DEFAULT_OPENER,
    PARAPHRASE_OPENERS,
    color_attr_record,
    counting_record,
    position_record,
)
from blip3o.world.scene import COLOR_NAMES, RELATIONS, SHAPES

RIDGES = (1e-3, 1e-2, 0.1, 1.0, 10.0)  # times the feature width
OPENERS = (DEFAULT_OPENER, *PARAPHRASE_OPENERS)


def probe_prompts() -> dict[str, tuple[list[str], np.ndarray, int, np.ndarray]]:
    """Per fact: (prompts, labels, number of classes, groups). A group is the prompt's shape (count) or its
    unordered pair of shapes (the others): `--split shapes` keeps each group on one side of the split."""
    colours = (None, *COLOR_NAMES)
    count = [(counting_record(s, n, c, o)["prompt"], COUNTING_NUMBERS.index(n))
             for s, n, c, o in itertools.product(SHAPES, COUNTING_NUMBERS, colours, OPENERS)]  # fmt: skip
    position = [(position_record(a, r, b, opener=o)["prompt"], RELATIONS.index(r), SHAPES.index(a))
                for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS for o in OPENERS]  # fmt: skip
    attr = [(color_attr_record(a, ca, b, cb, DEFAULT_OPENER)["prompt"], COLOR_NAMES.index(ca))
            for a, b in itertools.permutations(SHAPES, 2)
            for ca, cb in itertools.permutations(COLOR_NAMES, 2)]  # fmt: skip
    count_groups = np.array(
        [SHAPES.index(s) for s, *_ in itertools.product(SHAPES, COUNTING_NUMBERS, colours, OPENERS)]
    )
    pairs = sorted({frozenset(pair) for pair in itertools.permutations(SHAPES, 2)}, key=sorted)
    position_groups = np.array([pairs.index(frozenset((a, b))) for a, b in itertools.permutations(SHAPES, 2)
                                for _ in RELATIONS for _ in OPENERS])  # fmt: skip
    attr_groups = np.array([pairs.index(frozenset((a, b))) for a, b in itertools.permutations(SHAPES, 2)
                            for _ in itertools.permutations(COLOR_NAMES, 2)])  # fmt: skip
    return {
        "count": ([p for p, _ in count], np.array([y for _, y in count]), len(COUNTING_NUMBERS), count_groups),
        "relation": ([p for p, _, _ in position], np.array([y for _, y, _ in position]), len(RELATIONS),
                     position_groups),
        "subject": ([p for p, _, _ in position], np.array([y for _, _, y in position]), len(SHAPES),
                    position_groups),
        "first colour": ([p for p, _ in attr], np.array([y for _, y in attr]), len(COLOR_NAMES), attr_groups),
    }  # fmt: skip


@torch.no_grad()
def representations(model: Blip3o, prompts: list[str], batch: int = 256) -> dict[str, np.ndarray]:
    """The read-outs of each prompt, each (P, D): four, and two more when the DiT has a condition resampler."""
    backbone = model.backbone
    n_queries = backbone.config.n_queries
    language_model = backbone.vlm.model.language_model
    out: dict[str, list[torch.Tensor]] = {"words": [], "prompt states": [], "queries mean": [], "queries": []}
    for start in range(0, len(prompts), batch):
        inputs = backbone.generation_inputs(prompts[start : start + batch])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]  # (B, T)
        states = backbone.generation_hidden_states(ids, mask)  # (B, T, H)
        hidden, condition = (
            states[:, :-n_queries],
            states[:, -n_queries:],
        )  # prompt's; the DiT's input (B, Q, H)
        text = mask[:, :-n_queries].unsqueeze(-1).float()  # (B, T - Q, 1): 1 on prompt tokens
        embeds = language_model.embed_tokens(ids[:, :-n_queries])  # (B, T - Q, H)
        out["words"].append((embeds * text).sum(1) / text.sum(1))  # (B, H)
        out["prompt states"].append((hidden * text).sum(1) / text.sum(1))  # (B, H)
        out["queries mean"].append(condition.mean(1))  # (B, H)
        out["queries"].append(condition.flatten(1))  # (B, Q * H)
        if model.dit.resampler is not None:
            slots = model.dit.resample_condition(condition.float())  # (B, S, H)
            out.setdefault("slots", []).append(slots.flatten(1))  # (B, S * H)
            out.setdefault("slots 1-2", []).append(slots[:, :2].flatten(1))  # (B, 2 * H)
    return {k: torch.cat(v).float().numpy() for k, v in out.items()}


def ridge_accuracy(x: np.ndarray, y: np.ndarray, classes: int, fit: int, ridge: float) -> float:
    """Held-out accuracy of a one-vs-all ridge probe fit on the first `fit` rows of standardised (N, D) `x` and
    scored on the rest. Solved in the dual (kernel) form: the queries' read-out is 8,192 wide against a few
    hundred prompts. Targets are centred on the fit rows, which stands in for a bias."""
    targets = np.eye(classes)[y[:fit]]  # (fit, classes)
    mean = targets.mean(0)
    kernel = x[:fit] @ x[:fit].T  # (fit, fit)
    alpha = np.linalg.solve(kernel + ridge * len(x[0]) * np.eye(fit), targets - mean)  # (fit, classes)
    scores = x[fit:] @ (x[:fit].T @ alpha) + mean  # (N - fit, classes)
    return float((scores.argmax(1) == y[fit:]).mean())


def probe(
    features: np.ndarray, labels: np.ndarray, classes: int, seed: int, groups: np.ndarray | None = None
) -> float:
    """Held-out accuracy with the ridge picked on a validation split: 60/20/20 of the prompts in a seeded order,
    or, with `groups`, of the groups (every prompt of a group on the same side)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(len(labels))
        fit, val = int(0.6 * len(labels)), int(0.8 * len(labels))
    else:
        names = rng.permutation(np.unique(groups))
        cuts = [round(0.6 * len(names)), round(0.8 * len(names))]
        parts = [np.flatnonzero(np.isin(groups, part)) for part in np.split(names, cuts)]
        order = np.concatenate(parts)
        fit, val = len(parts[0]), len(parts[0]) + len(parts[1])
    x = features[order].astype(np.float64)
    x = (x - x[:fit].mean(0)) / (x[:fit].std(0) + 1e-6)  # (N, D), standardised by the fit rows
    y = labels[order]
    best = max(RIDGES, key=lambda r: ridge_accuracy(x[:val], y[:val], classes, fit, r))
    return ridge_accuracy(np.r_[x[:fit], x[val:]], np.r_[y[:fit], y[val:]], classes, fit, best)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds (mean reported)")
    parser.add_argument(
        "--split", choices=["prompts", "shapes"], default="shapes",
        help="hold out random prompts, or whole shapes / shape pairs (no test prompt's shapes seen in fitting)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Blip3o.from_pretrained(args.model).eval()
    result = {"model": args.model, "split": args.split, "facts": {}}
    cache: dict[tuple, dict] = {}  # relation and subject share their prompts
    for fact, (prompts, labels, classes, groups) in probe_prompts().items():
        if tuple(prompts) not in cache:
            cache[tuple(prompts)] = representations(model, prompts)
        reps = cache[tuple(prompts)]
        row = {"prompts": len(prompts), "chance": round(float(np.bincount(labels).max() / len(labels)), 3)}
        for name, features in reps.items():
            held = groups if args.split == "shapes" else None
            row[name] = round(
                float(np.mean([probe(features, labels, classes, s, held) for s in args.seeds])), 3
            )
        result["facts"][fact] = row
        print(f"{fact:13s} ({len(prompts):4d} prompts, chance {row['chance']:.2f}): "
              + ", ".join(f"{k} {row[k]:.3f}" for k in reps))  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
