"""The run's own evaluation: once every stage is trained, score the final model with the project's judges.

A recipe that ends with its own scores is one a user can compare against the model card without knowing which
commands to run. Results go to <out>/eval: `geneval/` (the sample layout and summary of
`blip3o eval geneval`), `vqa.json` (as `blip3o eval vqa --out`) and `summary.json` (the headline numbers and
the time taken). A finished evaluation is not repeated when the run is resumed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from blip3o.models.blip3o import Blip3o
from blip3o.train.config import EvalConfig

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


def evaluate_run(config: EvalConfig, model_dir: Path, out: Path, progress: bool = True) -> dict | None:
    """Evaluate `model_dir` as `config` says into `out`; returns the summary (None when nothing to do)."""
    from blip3o.eval.model_eval import format_summary, format_vqa_summary, geneval_with_model, vqa_with_model

    if not config.enabled:
        return None
    summary_path = out / SUMMARY_NAME
    if summary_path.exists():
        log.info("evaluation already done: %s", summary_path)
        return json.loads(summary_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    model = Blip3o.from_pretrained(model_dir)
    summary: dict = {"model": str(model_dir)}
    if config.geneval_seeds:
        start = time.perf_counter()
        geneval_dir = out / "geneval"
        if geneval_dir.exists():  # an evaluation interrupted half-way: its samples are incomplete
            shutil.rmtree(geneval_dir)
        result = geneval_with_model(
            model,
            geneval_dir,
            seeds=config.geneval_seeds,
            max_prompts=config.geneval_max_prompts or None,
            images_per_prompt=config.geneval_images_per_prompt or None,
            progress=progress,
        )
        print(format_summary(result), flush=True)
        summary["geneval"] = {"overall": result["overall"], "categories": result["categories"]}
        summary["geneval_wall_s"] = time.perf_counter() - start
    if config.vqa_questions >= 0:
        start = time.perf_counter()
        result = vqa_with_model(model, n_questions=config.vqa_questions or None, progress=progress)
        print(format_vqa_summary(result), flush=True)
        (out / "vqa.json").write_text(json.dumps(result, indent=2) + "\n")
        summary["vqa"] = {"overall": result["overall"], "per_kind": result["per_kind"]}
        summary["vqa_wall_s"] = time.perf_counter() - start
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_path)  # written last and atomically: its presence means the evaluation finished
    log.info("evaluation written to %s", out)
    return summary
