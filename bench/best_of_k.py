"""Best of K: can the model's own scores pick, among K samples of a prompt, one the ShapesGenEval judge passes?

    .venv/bin/python bench/best_of_k.py [MODEL] [--k 4] [--prompts 150] [--seed 1000] [--out rows.json]
    .venv/bin/python bench/best_of_k.py --rows rows.json [--accept 0.25]

For a balanced subset of the evaluation prompts it draws K images per prompt (the model's default sampler;
prompt batch b uses seed SEED + b), judges every image, and scores each with two numbers the model itself gives:
- clip: cosine of CLIP's image embedding of the picture and its text embedding of the prompt (DALL-E's
  reranking, with the CLIP trained here);
- caption: the backbone's log-likelihood of the prompt as its answer to the short-caption request
  ("Describe the image briefly.", stage 1's) about the picture: the understanding side grading the generation.
  The prompt is the same for all K, so its wording ("a photo of") shifts every candidate alike.
- check: the backbone's summed log-likelihood of the answers the prompt implies to ShapesVQA questions
  (blip3o.eval.self_check: how many shapes in all, how many of each named shape, what shape the object of each
  named colour is), read from the prompt's words alone; what `--self-check K` keeps.
- check@P: `--self-check K --self-check-accept P` replayed on the same candidates: the first whose check
  probability is >= P, else the best check (and how many candidates that draws on average).
`--rows FILE` reports an earlier run's `--out` rows without sampling.
It prints, per category, the mean single-sample pass rate, the pass rate of the candidate each score ranks
first (and of the sum of both scores' within-prompt z-scores), and the oracle (any of the K passes), then how
many objects the judge finds in the candidates each score picks against all of them.
Session 38 (bundle of 84c2b01, defaults): single 0.748, clip 0.769, caption 0.748, both 0.771, oracle 0.995;
the gain is colour binding's (color_attr 0.660 -> 0.833 / 0.889), position loses (0.689 -> 0.649 / 0.541).
Session 41 (bundle of 01211fa, defaults): single 0.738, clip 0.721, caption 0.739, check 0.873, both 0.728, oracle
0.980 (check: two_object 0.700, counting 0.733, position 0.973, color_attr 0.861).
Session 42 (`--rows` of session 41's rows): check@0.25 0.890 drawing 2.15 of 4 candidates per prompt on average
(check@0.5 0.891 / 3.15 drawn; means of the category means); the full-benchmark measurement is in docs/bench/object_target.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from blip3o.eval.geneval import score_detections
from blip3o.eval.model_eval import balanced_subset
from blip3o.eval.self_check import answer_log_probs, check_scores
from blip3o.models.blip3o import Blip3o
from blip3o.train.data import SHORT_CAPTION_PROMPT
from blip3o.world.judge import detect
from blip3o.world.prompts import CATEGORIES, load_eval_prompts

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "blip3o" / "bundled" / "model"
SCORES = ("clip", "caption", "check")
PAIR_SCORES = ("clip", "caption")  # the "both" ranking: the sum of these two scores' z-scores


@torch.no_grad()
def clip_scores(model: Blip3o, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """(n,) cosine similarity of each image with its text under the model's CLIP."""
    image = F.normalize(model.clip.image_embeddings(model.clip.preprocess(images)), dim=-1)  # (n, P)
    tokens = model.clip_text_inputs(texts)
    text = F.normalize(model.clip.text_embeddings(tokens["input_ids"], tokens["attention_mask"]), dim=-1)
    return (image * text).sum(-1)  # (n,)


def caption_scores(model: Blip3o, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """(n,) summed log-probability of each text as the backbone's short caption of its image."""
    return answer_log_probs(model, images, [SHORT_CAPTION_PROMPT] * len(texts), texts)


def z_scores(values: list[float]) -> list[float]:
    mean, spread = statistics.mean(values), statistics.pstdev(values) or 1.0
    return [(v - mean) / spread for v in values]


def picks(candidates: list[dict]) -> dict[str, dict]:
    """The candidate each ranking puts first: by each score, and by the sum of both scores' z-scores."""
    chosen = {name: max(candidates, key=lambda c: c[name]) for name in SCORES}
    both = [
        sum(parts) for parts in zip(*(z_scores([c[n] for c in candidates]) for n in PAIR_SCORES), strict=True)
    ]
    chosen["both"] = candidates[max(range(len(candidates)), key=both.__getitem__)]
    return chosen


def accepted_pick(candidates: list[dict], accept: float) -> tuple[dict, int]:
    """`--self-check-accept`'s choice replayed on drawn candidates: the first (in sample order) whose check
    score is >= log(accept), else the best check score; and how many candidates that drew."""
    ordered = sorted(candidates, key=lambda c: c["sample"])
    for drawn, candidate in enumerate(ordered, 1):
        if candidate["check"] >= math.log(accept):
            return candidate, drawn
    return max(ordered, key=lambda c: c["check"]), len(ordered)


def report(rows: list[dict], accept: float) -> str:
    by_prompt: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        by_prompt[(row["tag"], row["index"])].append(row)
    accepted = f"check@{accept:g}"
    columns = ("single", *SCORES, accepted, "both", "oracle")
    draws: list[int] = []
    sums: dict[str, Counter] = defaultdict(Counter)
    prompts: Counter = Counter()
    objects: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for (tag, _), candidates in by_prompt.items():
        prompts[tag] += 1
        sums[tag]["single"] += statistics.mean(c["passed"] for c in candidates)
        sums[tag]["oracle"] += any(c["passed"] for c in candidates)
        for name, chosen in picks(candidates).items():
            sums[tag][name] += chosen["passed"]
            objects[tag][name][chosen["objects"]] += 1
        chosen, drawn = accepted_pick(candidates, accept)
        sums[tag][accepted] += chosen["passed"]
        draws.append(drawn)
        for c in candidates:
            objects[tag]["all"][c["objects"]] += 1
    tags = [t for t in CATEGORIES if t in prompts]
    lines = [f"{'category':14s} {'prompts':>7s} " + " ".join(f"{c:>7s}" for c in columns)]
    for tag in tags:
        lines.append(
            f"{tag:14s} {prompts[tag]:7d} " + " ".join(f"{sums[tag][c] / prompts[tag]:7.3f}" for c in columns)
        )
    overall = [statistics.mean(sums[t][c] / prompts[t] for t in tags) for c in columns]
    lines.append(f"{'overall':14s} {'':7s} " + " ".join(f"{v:7.3f}" for v in overall))
    k = max(len(c) for c in by_prompt.values())
    lines.append(f"\n{accepted}: {statistics.mean(draws):.2f} candidates drawn per prompt on average, of {k}")
    lines.append("\nobjects the judge finds in the picked candidates (all: every candidate):")
    for tag in tags:
        for name in ("all", *SCORES):
            lines.append(f"  {tag:14s} {name:8s} {dict(sorted(objects[tag][name].items()))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=str(BUNDLED))
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=150, help="balanced subset of the evaluation prompts")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--out", help="also write every candidate's row here (JSON)")
    parser.add_argument(
        "--accept",
        type=float,
        default=0.25,
        help="the check@P column's acceptance probability (default 0.25)",
    )
    parser.add_argument("--rows", help="report the rows of an earlier --out file instead of sampling")
    args = parser.parse_args(argv)
    if not 0 < args.accept <= 1:
        sys.exit("--accept must be a probability in (0, 1]")
    if args.rows:
        print(report(json.loads(Path(args.rows).read_text()), args.accept))
        return
    if args.k < 2:
        sys.exit("--k must be at least 2 (a ranking needs candidates)")

    model = Blip3o.from_pretrained(args.model).eval()
    prompts = balanced_subset(load_eval_prompts(), args.prompts)
    rows: list[dict] = []
    start = time.perf_counter()
    for b, first in enumerate(range(0, len(prompts), args.batch)):
        chunk = prompts[first : first + args.batch]
        texts = [record["prompt"] for _, record in chunk]
        images = model.generate(texts, num_images=args.k, seed=args.seed + b, batch_size=64)  # prompt-major
        repeated = [t for t in texts for _ in range(args.k)]
        scores = {
            "clip": clip_scores(model, images, repeated),
            "caption": caption_scores(model, images, repeated),
            "check": check_scores(model, images, repeated),
        }
        for i, image in enumerate(images):
            index, record = chunk[i // args.k]
            detections = detect(image)
            rows.append(
                {
                    "index": index,
                    "tag": record["tag"],
                    "sample": i % args.k,
                    "passed": score_detections(record, detections)[0],
                    "objects": len(detections),
                    **{name: float(values[i]) for name, values in scores.items()},
                }
            )
        print(f"{first + len(chunk)}/{len(prompts)} prompts, {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows))
    print(f"\nmodel {args.model}, K {args.k}, seed {args.seed}\n")
    print(report(rows, args.accept))


if __name__ == "__main__":
    main()
