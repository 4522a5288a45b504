"""Run a design study: train every variant for the same wall-time budget, measure it at regular points, report.

Layout of a study folder:
    <out>/results.json             every measurement, written atomically after each point (resume reads it)
    <out>/report.md, <out>/*.png   the report (rewritten after each point)
    <out>/data/                    ShapesWorld shards (unless --shards is given)
    <out>/<variant>/init/          the variant's starting model (base parts + fresh queries and DiT)
    <out>/<variant>/<stage>/       train_stage's folder: checkpoints (one per point), log.jsonl, model/
    <out>/<variant>/points/<k>/    point k's GenEval images and scores
    <out>/vae_fm/vae/              vae_fm's VAE stage (its stage 0, on its own budget)

Time accounting: a variant's training time is the time inside the optimisation loop (`StageResult.train_s`),
summed over its segments; setup, checkpointing, export and every measurement are outside it (recorded as
overhead_s and measure_s). Segment k stops once the variant's cumulative training time reaches k/points of
the budget, so every variant is measured at the same training times.

Resume: run the same command again. Measured points are kept; a segment whose training finished is measured
without retraining; a segment cut short is retrained from the previous point's checkpoint (newer checkpoints
are removed first, since the training time they hold was never recorded).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from blip3o.eval.clip_features import clip_score
from blip3o.eval.model_eval import vqa_with_model
from blip3o.models.blip3o import Blip3o
from blip3o.models.decoder import images_to_tensor
from blip3o.study.config import VARIANTS, StudyConfig, StudyError
from blip3o.study.measure import measure_model, reference_images
from blip3o.study.report import write_report
from blip3o.study.variants import (
    GENERATION_STAGE_INDEX,
    VAE_STAGE,
    budgeted_stage,
    fresh_variant_model,
    run_config,
    tokens_per_image,
    vae_stage,
)
from blip3o.train.checkpoint import CHECKPOINTS, STEP_DIR
from blip3o.train.data import ensure_shards, load_shards
from blip3o.train.loop import STATS_IMAGES, export_model, train_stage, write_json_atomic
from blip3o.train.parallelize import init_distributed
from blip3o.train.stages import fit_vae_scaling

log = logging.getLogger("blip3o.study")
RESULTS_FILE = "results.json"


def load_results(out: Path, config: StudyConfig, command: str) -> dict:
    """The study's results so far, or a new record; a folder holding a different study is refused."""
    path = out / RESULTS_FILE
    settings = config.to_dict()
    if not path.exists():
        return {
            "commands": [command],
            "settings": settings,
            "environment": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
            },
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "base": {},
            "variants": {},
        }
    results = json.loads(path.read_text())
    # The variant list may grow between runs (each variant's numbers stand alone); nothing else may change.
    old = {k: v for k, v in results["settings"].items() if k != "variants"}
    new = {k: v for k, v in settings.items() if k != "variants"}
    if old != new:
        changed = sorted(k for k in new if old.get(k) != new[k])
        raise StudyError(
            f"{out} holds a study with different settings ({', '.join(changed)}); "
            "use a new --out folder or the same options to resume"
        )
    results["settings"]["variants"] = list(
        dict.fromkeys([*results["settings"]["variants"], *config.variants])
    )
    if command not in results["commands"]:
        results["commands"].append(command)
    return results


def rollback_checkpoints(stage_dir: Path, keep_step: int) -> None:
    """Remove checkpoints newer than `keep_step`; fail if a resume needs `keep_step`'s and it is gone."""
    root = stage_dir / CHECKPOINTS
    steps = {}
    if root.is_dir():
        for entry in root.iterdir():
            match = STEP_DIR.match(entry.name)
            if match:
                steps[int(match.group(1))] = entry
    for step, entry in steps.items():
        if step > keep_step:
            log.warning("removing %s: training beyond the last measured point (step %d)", entry, keep_step)
            shutil.rmtree(entry)
    if keep_step > 0 and keep_step not in steps:
        raise StudyError(f"cannot resume: {root} has no checkpoint of the last measured step {keep_step}")


class Study:
    """One study folder being run: shared data, the measuring CLIP, the results record."""

    def __init__(self, config: StudyConfig, out: Path, command: str, progress: bool, device: str):
        self.config, self.out, self.progress = config, out, progress
        out.mkdir(parents=True, exist_ok=True)
        self.results = load_results(out, config, command)
        self.dist = init_distributed(device)
        shard_dir = Path(config.shards) if config.shards else out / "data"
        if not config.shards:
            ensure_shards(shard_dir, config.num_samples, seed=0, is_main=True)
        self.shard_dir = str(shard_dir)
        self.examples, _ = load_shards(shard_dir)
        base = Blip3o.from_pretrained(config.base).to(self.dist.device)
        self.instrument = base.eval()  # measures with its CLIP (and tokenizer); never trained here
        self.reference, reference_prompts = reference_images(config)
        if "reference_clip_score" not in self.results["base"]:
            # What real renders of the same prompts score: the level a perfect generator would reach.
            self.results["base"]["reference_clip_score"] = clip_score(base, self.reference, reference_prompts)
        if "vqa" not in self.results["base"]:
            # The sequential design's understanding: the stage-1 backbone every frozen variant keeps.
            vqa = vqa_with_model(base, n_questions=config.vqa_questions)
            self.results["base"].update(path=config.base, vqa=vqa["overall"]["mean"], vqa_n=vqa["n"])
            self.save()

    def save(self) -> None:
        write_json_atomic(self.out / RESULTS_FILE, self.results)
        write_report(self.out, self.results)

    def run(self) -> dict:
        for variant in self.config.variants:
            self.run_variant(variant)
        self.save()
        return self.results

    # ---- one variant -----------------------------------------------------------------------------------

    def variant_state(self, variant: str) -> dict:
        spec = VARIANTS[variant]
        return self.results["variants"].setdefault(
            variant,
            {"label": spec.label, "target": spec.target, "objective": spec.objective, "kind": spec.kind,
             "points": [], "pending": None},
        )  # fmt: skip

    def initial_model(self, variant: str, state: dict) -> Path:
        """The variant's starting model on disk (built once: every segment's frozen parts come from it)."""
        init_dir = self.out / variant / "init"
        if (init_dir / "config.json").is_file():
            return init_dir
        model = fresh_variant_model(Blip3o.from_pretrained(self.config.base), variant, self.config)
        if model.vae is not None:
            model = self.train_vae(model, state)
        state["tokens_per_image"] = tokens_per_image(model)
        export_model(model, init_dir)
        return init_dir

    def train_vae(self, model: Blip3o, state: dict) -> Blip3o:
        """vae_fm's stage 0: the VAE for `vae_minutes` (one uninterrupted call; a crash restarts it), then its
        latent scaling fitted on the data, as train_stage would at the start of generation."""
        stage = vae_stage(self.config)
        shutil.rmtree(self.out / "vae_fm" / VAE_STAGE, ignore_errors=True)
        print(f"[study] vae_fm: training the VAE for {self.config.vae_minutes:g} min (not in the budget)")
        result = train_stage(
            model, stage, 0, run_config(model, stage, self.config, self.shard_dir), self.out / "vae_fm",
            self.examples, self.dist, rebuild=None, progress=False, stop_after_s=self.config.vae_minutes * 60,
        )  # fmt: skip
        model = Blip3o.from_pretrained(result.model_dir).to(self.dist.device)
        fit_vae_scaling(model, [e.image for e in self.examples[:STATS_IMAGES]])
        with torch.no_grad():
            pixels = images_to_tensor(self.reference).to(self.dist.device)  # (N, 3, H, W) in [-1, 1]
            l1 = (
                sum(
                    float(
                        (model.vae.decode(model.vae.encode(pixels[i : i + 64])) - pixels[i : i + 64])
                        .abs()
                        .sum()
                    )
                    for i in range(0, len(pixels), 64)
                )
                / pixels.numel()
            )
        state["vae_stage"] = {"steps": result.end_step, "train_s": result.train_s, "final_loss": result.final_loss,
                              "reconstruction_l1": l1, "minutes_budget": self.config.vae_minutes}  # fmt: skip
        print(
            f"[study] vae_fm: VAE {result.end_step} steps in {result.train_s:.0f} s, reconstruction L1 {l1:.4f}"
        )
        return model

    def run_variant(self, variant: str) -> None:
        config = self.config
        state = self.variant_state(variant)
        if len(state["points"]) >= config.points:
            print(f"[study] {variant}: all {config.points} points measured, skipped")
            return
        init_dir = self.initial_model(variant, state)
        if "tokens_per_image" not in state:  # a resumed study whose init was written before the record
            state["tokens_per_image"] = tokens_per_image(Blip3o.from_pretrained(init_dir))
        stage = budgeted_stage(variant, config)
        variant_dir = self.out / variant
        for k in range(len(state["points"]), config.points):
            previous = state["points"][-1] if state["points"] else {"step": 0, "train_s": 0.0}
            pending = state["pending"]
            trained = (
                pending is not None
                and pending["point"] == k + 1
                and (variant_dir / stage.name / CHECKPOINTS / f"step_{pending['step']:08d}").is_dir()
            )
            if not trained:
                rollback_checkpoints(variant_dir / stage.name, previous["step"])
                model = Blip3o.from_pretrained(init_dir)
                budget_left = max((k + 1) * config.segment_s - previous["train_s"], 0.0)
                result = train_stage(
                    model, stage, GENERATION_STAGE_INDEX, run_config(model, stage, config, self.shard_dir),
                    variant_dir, self.examples, self.dist, rebuild=None, progress=False, stop_after_s=budget_left,
                )  # fmt: skip
                del model
                pending = {
                    "point": k + 1, "step": result.end_step, "train_s": previous["train_s"] + result.train_s,
                    "segment_steps": result.steps_run, "segment_train_s": result.train_s,
                    "overhead_s": result.seconds - result.train_s, "loss": result.final_loss,
                }  # fmt: skip
                state["pending"] = pending
                self.save()
            model = Blip3o.from_pretrained(variant_dir / stage.name / "model").to(self.dist.device)
            measured = measure_model(
                model,
                self.instrument,
                config,
                variant_dir / "points" / str(k + 1),
                self.reference,
                self.progress,
            )
            del model
            samples = pending["step"] * config.batch_size
            point = {
                **pending,
                "samples": samples,
                "samples_per_s": samples / max(pending["train_s"], 1e-9),
                "segment_samples_per_s": pending["segment_steps"]
                * config.batch_size
                / max(pending["segment_train_s"], 1e-9),
                **measured,
            }
            state["points"].append(point)
            state["pending"] = None
            self.save()
            print(
                f"[study] {variant} point {k + 1}/{config.points}: step {point['step']}, "
                f"train {point['train_s']:.0f} s ({point['segment_samples_per_s']:.1f} samples/s) | "
                f"GenEval {point['geneval']['overall']:.3f} | diversity {point['diversity']['image']:.3f} | "
                f"CLIP score {point['clip_score']['mean']:.3f} | CLIP-FD {point['frechet_clip']:.3f} | VQA {point['vqa']['overall']:.3f} | "
                f"measured in {point['measure_s']:.0f} s",
                flush=True,
            )


def run_study(
    config: StudyConfig, out: str | Path, command: str, progress: bool = True, device: str = "cpu"
) -> dict:
    """Run (or resume) the study in `out`; returns the results record (also in <out>/results.json)."""
    return Study(config, Path(out), command, progress, device).run()
