"""Loss curves of a training run: one CSV and one PNG, optionally over a reference run's curves.

A run folder holds `<stage>/log.jsonl` per stage (written by the training loop). The CSV has one row per
logged step (`stage, step, loss, grad_norm, lr, samples_per_s`) and is also what a reference is read from,
so a user can overlay their run on the committed reference curves of a recipe.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

FIELDS = ("stage", "step", "loss", "grad_norm", "lr", "samples_per_s")


class CurvesError(ValueError):
    """A run folder or a reference CSV that holds no curves."""


def read_run(run_dir: str | Path) -> dict[str, list[dict]]:
    """Logged records per stage, in the run's stage order (from its config.json when present)."""
    run_dir = Path(run_dir)
    order: list[str] = []
    config = run_dir / "config.json"
    if config.exists():
        order = [s["name"] for s in json.loads(config.read_text())["stages"]]
    logs = {p.parent.name: p for p in run_dir.glob("*/log.jsonl")}
    stages = [s for s in order if s in logs] + sorted(s for s in logs if s not in order)
    curves = {
        s: [json.loads(line) for line in logs[s].read_text().splitlines() if line.strip()] for s in stages
    }
    curves = {s: records for s, records in curves.items() if records}
    if not curves:
        raise CurvesError(f"no training logs (<stage>/log.jsonl) in {run_dir}")
    return curves


def read_csv(path: str | Path) -> dict[str, list[dict]]:
    """Curves from a CSV written by `write_csv`."""
    curves: dict[str, list[dict]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            record = {k: float(row[k]) for k in FIELDS[2:] if row.get(k) not in (None, "")}
            record["step"] = int(row["step"])
            curves.setdefault(row["stage"], []).append(record)
    if not curves:
        raise CurvesError(f"{path} holds no curves")
    return curves


def write_csv(curves: dict[str, list[dict]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for stage, records in curves.items():
            for r in records:
                writer.writerow({"stage": stage, **r})
    return path


def plot(curves: dict[str, list[dict]], path: str | Path, reference: dict[str, list[dict]] | None = None,
         title: str = "") -> Path:  # fmt: skip
    """One panel per stage: loss against step (log scale), with the reference run dashed when given."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    stages = list(curves)
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        records = curves[stage]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="this run", color="C0")
        if reference and stage in reference:
            ref = reference[stage]
            ax.plot([r["step"] for r in ref], [r["loss"] for r in ref], "--", label="reference", color="C1")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    if reference:
        axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
