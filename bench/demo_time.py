"""How long `blip3o demo` takes from a user's point of view: a fresh Python process, imports, model load,
generation, judging, answering and writing, all counted.

    .venv/bin/python bench/demo_time.py                          # the bundled model
    .venv/bin/python bench/demo_time.py --model runs/x/final --repeat 2
    .venv/bin/python bench/demo_time.py -- --steps 10            # anything after -- goes to blip3o demo

Runs `python -m blip3o.cli.main demo` (what the `blip3o` console script calls) in a subprocess per repeat,
writing into a temporary folder unless --out is given, and prints the wall seconds of each run and the
demo's own score line. The first run may be slower (cold file cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(model: Path | None, out: Path, extra: list[str]) -> tuple[float, dict]:
    """One `blip3o demo` in a fresh interpreter: (wall seconds, its summary.json)."""
    cmd = [sys.executable, "-m", "blip3o.cli.main", "demo", "--out", str(out), *extra]
    if model is not None:
        cmd += ["--model", str(model)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"blip3o demo failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return wall, json.loads((out / "summary.json").read_text())


def score_line(summary: dict) -> str:
    gen, vqa, timing = summary["geneval"], summary["vqa"], summary["timing"]
    passed = sum(item["correct"] for item in gen["items"])
    return (
        f"GenEval overall {gen['overall']:.3f} ({passed}/{gen['images']} prompts pass), "
        f"VQA {vqa['accuracy']:.3f} ({vqa['correct']}/{vqa['n']}); "
        f"the demo's own total {timing['total_s']:.1f} s (model load {timing['load_s']:.1f} s)"
    )


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    p.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    p.add_argument("--repeat", type=int, default=1, help="runs, each in a fresh process (default 1)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        for k in range(args.repeat):
            wall, summary = run_once(args.model, out, extra)
            print(f"run {k + 1}: {wall:.1f} s wall (interpreter start and model load included)")
            print(f"  {score_line(summary)}")
        settings = ", ".join(f"{key} {value}" for key, value in summary["settings"].items())
        print(f"model {summary['model']}; {settings}")


if __name__ == "__main__":
    main()
