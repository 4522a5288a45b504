"""One ShapesGenEval category in an object-centric model's generated tokens, over many sampling seeds.

    .venv/bin/python bench/token_category.py MODEL [--category counting] [--seeds 20] [--cfg 3]
        [--count-guidance S] [--pixels [--decoder-steps K] [--decoder-cfg W] [--gaps] [--why-few]]

`bench/label_judge.py` scores 240 balanced prompts once: 15 counting images and 20 two-object ones per seed, so a
category's score moves by 0.1 or more between seeds (session 33: 0.667 and 0.400 for two models whose counting
over 300 samples reads 0.480 and 0.537). This samples every evaluation prompt of one category with seeds 0 ..
N-1 (the DiT only, no pixel decoder: ~7 s per seed for counting's 15 prompts on 2 cores), reads the tokens with
CLIP's label head as label_judge does and prints the pass rate; for counting, also how many of each wanted count
hold too few or too many objects of the named shape. With `--pixels` the model's decoder also draws the tokens
(decoder seed = sampling seed) and the pixel judge scores the images the same way: how much of a token-level
change survives the decoder (session 33: the decoder drops objects, so too many in the tokens can pass in pixels).
`--gaps` (with --pixels) groups the samples by (tokens pass, pixels pass) and gives each group's closest pair of
read token boxes (label head centre + mean side; `box_gap`, negative on overlap): session 54 found the pixels lose
counts the tokens hold where the DiT overlaps two objects (real scenes keep >= 2 px). `--why-few` (counting, with
--pixels) says why each image with too few of the named shape falls short, by the tokens' verdict: "rejected" (the
judge measured enough objects but put one under its confidence threshold: a soft, tiny or atypical outline) or
"missing" (too few objects at all: two drawn as one, or one not drawn); session 64: 13 and 13 of the 26 where the
tokens pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import Counter, defaultdict

import torch

from blip3o.eval.geneval import score_detections
from blip3o.train.scene_supervision import object_label_detections
from blip3o.world.judge import (
    DEFAULT_MIN_CONFIDENCE,
    Candidate,
    detections_of,
    find_candidates,
    load_shape_model,
)
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.scene import box_gap
from label_judge import load_label_model, read_targets  # bench/ is on sys.path when a bench script runs


def count_outcome(record: dict, detections: list) -> str:
    """A counting prompt's verdict: "pass", or why not: "few" / "many" objects of the named shape, or "other"
    (the right count of it, failing another check)."""
    if score_detections(record, detections)[0]:
        return "pass"
    want = record["include"][0]
    found = sum(d.shape == want["class"] for d in detections)
    return "few" if found < want["count"] else "many" if found > want["count"] else "other"


def tally(outcomes: Counter, category: str, record: dict, detections: list) -> bool:
    """Count one sample's verdict in `outcomes` ("pass" / "fail"; for counting also "want N: why"); returns it."""
    if category == "counting":
        outcome = count_outcome(record, detections)  # scores the prompt once, says why it fails
        outcomes[f"want {record['include'][0]['count']}: {outcome}"] += 1
        passed = outcome == "pass"
    else:
        passed = score_detections(record, detections)[0]
    outcomes["pass" if passed else "fail"] += 1
    return passed


def summary(outcomes: Counter, samples: int) -> dict:
    return {"pass_rate": outcomes["pass"] / samples, "outcomes": dict(sorted(outcomes.items()))}


def few_reason(record: dict, candidates: list[Candidate]) -> str:
    """Why a counting image with too few of the named shape falls short, from every object the judge measured:
    "rejected" when confident objects of the shape plus unconfident ones of any shape reach the count, else
    "missing"."""
    want = record["include"][0]
    sure = sum(c.shape == want["class"] and c.confidence >= DEFAULT_MIN_CONFIDENCE for c in candidates)
    unsure = sum(c.confidence < DEFAULT_MIN_CONFIDENCE for c in candidates)
    return "rejected" if sure + unsure >= want["count"] else "missing"


def closest_gap(detections: list) -> float | None:
    """The smallest `box_gap` between two of the detections (px; negative on overlap), None for fewer than 2."""
    return min((box_gap(a.box, b.box) for a, b in itertools.combinations(detections, 2)), default=None)


def gap_groups(gaps: dict[tuple[bool, bool], list]) -> dict[str, dict]:
    """{(tokens pass, pixels pass): closest gaps} -> per group: samples, and over those with 2+ objects the
    median gap and the shares overlapping (< 0 px) and closer than ShapesWorld's 2 px."""
    groups = {}
    for (tokens, pixels), values in sorted(gaps.items()):
        known = [g for g in values if g is not None]
        name = f"tokens {'pass' if tokens else 'fail'}, pixels {'pass' if pixels else 'fail'}"
        groups[name] = {"samples": len(values), "with_pairs": len(known)}
        if known:
            groups[name] |= {
                "median_gap": statistics.median(known),
                "overlapping": sum(g < 0 for g in known) / len(known),
                "closer_than_2px": sum(g < 2 for g in known) / len(known),
            }
    return groups


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder whose CLIP has an object label head")
    parser.add_argument("--category", default="counting", help="a ShapesGenEval tag, e.g. counting, position")
    parser.add_argument("--seeds", type=int, default=20, help="sampling seeds 0 .. N-1")
    parser.add_argument("--cfg", type=float, default=3.0, help="DiT guidance scale")
    parser.add_argument("--steps", type=int, help="DiT sampling steps (default: the model's)")
    parser.add_argument(
        "--count-guidance", type=float, default=0.0, help="steer sampling to the prompt's counts (0: off)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pixels", action="store_true", help="also judge the decoder's images of the tokens")
    parser.add_argument(
        "--decoder-steps", type=int, help="with --pixels: decoder sampling steps (default: the model's)"
    )
    parser.add_argument(
        "--decoder-cfg", type=float, help="with --pixels: decoder guidance (default: the model's)"
    )
    parser.add_argument(
        "--decoder-candidates", type=int, help="with --pixels: decodes per sample, the most faithful kept"
    )
    parser.add_argument("--gaps", action="store_true", help="with --pixels: closest token boxes by verdicts")
    parser.add_argument("--why-few", action="store_true", help="counting, --pixels: why images hold too few")
    args = parser.parse_args(argv)
    if args.gaps and not args.pixels:
        parser.error("--gaps needs --pixels (it groups samples by both verdicts)")
    if args.why_few and not (args.pixels and args.category == "counting"):
        parser.error("--why-few needs --pixels and --category counting")
    records = [r for r in load_eval_prompts() if r["tag"] == args.category]
    if not records:
        tags = sorted({r["tag"] for r in load_eval_prompts()})
        parser.error(f"no evaluation prompt has category {args.category!r}; categories: {', '.join(tags)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    model = load_label_model(args.model, parser)
    if args.decoder_candidates is not None:
        if args.decoder_candidates < 1:
            parser.error("--decoder-candidates must be >= 1")
        model.set_decoder_candidates(args.decoder_candidates)
    outcomes: Counter = Counter()
    pixel_outcomes: Counter = Counter()
    gaps: dict[tuple[bool, bool], list] = defaultdict(list)
    why_few: Counter = Counter()
    prompts = [r["prompt"] for r in records]
    with torch.no_grad():
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            target = model.generate_target(
                prompts, args.steps, args.cfg, generator, count_guidance=args.count_guidance
            )
            token_objects = [object_label_detections(reading) for reading in read_targets(model, target)]
            token_verdicts = [
                tally(outcomes, args.category, record, found)
                for record, found in zip(records, token_objects, strict=True)
            ]
            if args.pixels:
                images = model.decode_target(
                    target,
                    args.decoder_steps,
                    args.decoder_cfg,
                    generator=torch.Generator().manual_seed(seed),
                )
                for record, image, found, in_tokens in zip(
                    records, images, token_objects, token_verdicts, strict=True
                ):
                    candidates = find_candidates(image, load_shape_model())  # the judge's, rejected ones too
                    detections = detections_of(candidates)  # what detect(image) returns
                    in_pixels = tally(pixel_outcomes, args.category, record, detections)
                    if args.gaps:
                        gaps[(in_tokens, in_pixels)].append(closest_gap(found))
                    if args.why_few and count_outcome(record, detections) == "few":
                        reason = few_reason(record, candidates)
                        why_few[f"tokens {count_outcome(record, found)}: {reason}"] += 1
    samples = len(records) * args.seeds
    result = {
        "model": args.model,
        "category": args.category,
        "samples": samples,
        **summary(outcomes, samples),
    }
    if args.pixels:
        result["pixels"] = summary(pixel_outcomes, samples)
    if args.gaps:
        result["gaps"] = gap_groups(gaps)
    if args.why_few:
        result["why_few"] = dict(sorted(why_few.items()))
    guided = f", count guidance {args.count_guidance:g}" if args.count_guidance else ""
    print(
        f"{args.category}, cfg {args.cfg:g}{guided}, {samples} samples: tokens pass {result['pass_rate']:.3f}",
        end="",
    )
    print(f", pixels pass {result['pixels']['pass_rate']:.3f}" if args.pixels else "")
    for key in result["outcomes"]:
        if key.startswith("want"):
            in_pixels = f"  pixels {pixel_outcomes[key]}" if args.pixels else ""
            print(f"  {key:16s} tokens {outcomes[key]}{in_pixels}")
    for name, group in result.get("gaps", {}).items():
        line = f"  {name}: {group['samples']} samples"
        if "median_gap" in group:
            line += (f", closest token boxes median {group['median_gap']:.1f} px, overlapping "
                     f"{group['overlapping']:.2f}, closer than 2 px {group['closer_than_2px']:.2f}")  # fmt: skip
        print(line)
    for key, n in result.get("why_few", {}).items():
        print(f"  pixels too few, {key}: {n}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
