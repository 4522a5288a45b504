"""Issue 2's judge acceptance, measured and printed (not asserted: tests/test_judge_check.py asserts on a
smaller sample).

    python bench/judge_acceptance.py [--n 2000] [--seed 0]

- accuracy on fresh renders of evaluation prompts (scene sampled to satisfy the prompt), clean and degraded
  (Gaussian blur sigma 1 px, noise std 8/255, JPEG quality 75): per category and overall;
- specificity on near-miss renders (one attribute wrong): the share scored wrong, per category and kind.
"""

from __future__ import annotations

import argparse
import json
import time

from blip3o.eval.geneval import format_table
from blip3o.eval.judge_check import near_miss_specificity, prompt_accuracy


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="renders per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    out = {}
    for name, fn in (
        ("clean", lambda: prompt_accuracy(args.n, args.seed, degraded=False, progress=True)),
        ("degraded", lambda: prompt_accuracy(args.n, args.seed + 1, degraded=True, progress=True)),
        ("near_miss_rejected", lambda: near_miss_specificity(args.n, args.seed + 2, progress=True)),
    ):
        start = time.perf_counter()
        summary = fn()
        print(f"\n== {name}: {args.n} renders, {time.perf_counter() - start:.1f} s")
        print(format_table(summary))
        if "by_kind" in summary:
            for kind, k in summary["by_kind"].items():
                print(f"  near miss '{kind}': rejected {k['rejected']}/{k['renders']} = {k['rate']:.4f}")
        misses = summary.get("failures") or summary.get("wrongly_accepted") or []
        for m in misses[:8]:
            print("  example:", m)
        out[name] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
