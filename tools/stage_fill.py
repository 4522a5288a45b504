"""What the reuse tools (tools/reuse_*.py) share: the run's config, the source's curves, and a filled stage.

Not a command: the tools import it (their folder is on sys.path when they run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blip3o.eval.curves import read_csv
from blip3o.models.blip3o import Blip3o
from blip3o.train.config import RunConfig
from blip3o.train.loop import export_model


def read_run_config(run: Path, hint: str) -> RunConfig | None:
    """RUN/config.json, or None after saying it is missing and `hint` (how to write it)."""
    path = run / "config.json"
    if not path.is_file():
        print(f"{path} is missing: {hint}", file=sys.stderr)
        return None
    return RunConfig.from_dict(json.loads(path.read_text()))


def read_stage_curves(path: Path | None, stages: list[str]) -> dict | None:
    """Each stage's rows of a curves CSV (`blip3o curves` / `blip3o card`), {} without a file; None after saying
    which stages it has no rows for, before anything is written."""
    if path is None:
        return {}
    curves = read_csv(path)
    if missing := [s for s in stages if s not in curves]:
        print(f"{path} has no curves for stage(s) {', '.join(missing)}", file=sys.stderr)
        return None
    return curves


def reused_record(source: Path, note: str, tool: str, weights: str) -> dict:
    """A filled stage's reused.json: the source (with `note`, where it came from, if any), the tool and which of
    its weights were taken."""
    return {"source": f"{source} ({note})" if note else str(source), "tool": tool, "weights": weights}


def fill_stage(
    model: Blip3o, run: Path, stage: str, reused: dict, curves_path: Path | None, curves: dict
) -> None:
    """Export `model` as RUN/<stage>/model with its provenance: `reused` as reused.json (which `blip3o card`
    reports in place of a training time), and with a curves file the stage's rows as its log.jsonl."""
    export_model(model, run / stage / "model")
    if curves_path:
        lines = [json.dumps(record) for record in curves[stage]]
        (run / stage / "log.jsonl").write_text("\n".join(lines) + "\n")
        reused = {**reused, "log": f"copied from {curves_path}"}
    (run / stage / "reused.json").write_text(json.dumps(reused, indent=2) + "\n")
