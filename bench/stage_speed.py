"""Training throughput of each stage of a finished run, fp32 against bf16 autocast, on this machine.

    .venv/bin/python bench/stage_speed.py runs/s40/bundle --stages decoder refine --steps 40
    .venv/bin/python bench/stage_speed.py runs/s40/bundle --threads 1 --precisions fp32 bf16

For every named stage and precision it starts `blip3o train` in a scratch folder whose earlier stages are links
to the run's own (so the stage starts from the model it really started from), runs `--steps` steps of that
stage with a log line every `--log-every`, reads samples/s from the stage's log.jsonl and stops the process.
The figure is the median over the log windows after the first (which holds start-up). The run's config is
reproduced from its preset by `overrides_from_preset`; only the timed stage's length and logging, the precision
and the run's own evaluation change. Ratios within one invocation are what to compare: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blip3o.train.config import RunConfig
from blip3o.train.presets import overrides_from_preset


def stage_overrides(config: RunConfig, stage: str, steps: int, log_every: int, precision: str) -> list[str]:
    """The run's own overrides, then the timed stage shortened and logged often, in `precision`."""
    base = overrides_from_preset(config)
    if base is None:
        raise SystemExit(f"cannot restate the run's config as overrides of preset {config.preset!r}")
    return [
        *base,
        f"stages.{stage}.steps={steps}",
        f"stages.{stage}.warmup_steps=0",
        f"stages.{stage}.log_every={log_every}",
        f"stages.{stage}.ckpt_every={steps}",
        f"stages.{stage}.sample_every=0",
        f"precision={precision}",
    ]


def time_stage(run: Path, config: RunConfig, stage: str, args, precision: str) -> list[float]:
    """samples/s of each log window of `args.steps` steps of `stage`, started from the run's previous stage."""
    names = [s.name for s in config.stages]
    work = Path(tempfile.mkdtemp(prefix=f"speed_{stage}_{precision}_", dir=args.work))
    try:
        (work / "data").symlink_to((run / "data").resolve(), target_is_directory=True)
        for name in names[: names.index(stage)]:
            (work / name).symlink_to((run / name).resolve(), target_is_directory=True)
        command = [
            sys.executable, "-m", "blip3o.cli.train", "--preset", config.preset, "--out", str(work),
            "--no-progress", *stage_overrides(config, stage, args.steps, args.log_every, precision),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        log_path = work / stage / "log.jsonl"
        with open(work / "train.log", "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                while process.poll() is None:
                    if (
                        log_path.exists()
                        and len(log_path.read_text().splitlines()) >= args.steps // args.log_every
                    ):
                        break
                    time.sleep(1)
            finally:
                process.terminate()
                process.wait()
        if not log_path.exists():
            raise SystemExit(
                f"{stage} ({precision}) logged nothing; see its log:\n{(work / 'train.log').read_text()}"
            )
        return [json.loads(line)["samples_per_s"] for line in log_path.read_text().splitlines()]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, help="a finished run folder (config.json, data/, one folder per stage)"
    )
    parser.add_argument("--stages", nargs="+", help="stages to time (default: all of the run's)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--work", type=Path, default=None, help="where the scratch folders go (default: /tmp)"
    )
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must be at least twice --log-every (the first window is start-up)")
    config = RunConfig.from_dict(json.loads((args.run / "config.json").read_text()))
    stages = args.stages or [s.name for s in config.stages]
    print(f"run {args.run} ({config.preset}), {args.steps} steps per stage, threads {args.threads}")
    print(
        f"{'stage':<14} {'batch':>5} "
        + " ".join(f"{p + ' samples/s':>16}" for p in args.precisions)
        + "  ratio"
    )
    for stage in stages:
        rates = [statistics.median(time_stage(args.run, config, stage, args, p)[1:]) for p in args.precisions]
        ratio = f"  {rates[-1] / rates[0]:.2f}x" if len(rates) > 1 else ""
        batch = config.stage(stage).batch_size
        print(f"{stage:<14} {batch:>5} " + " ".join(f"{r:>16.1f}" for r in rates) + ratio, flush=True)


if __name__ == "__main__":
    main()
