"""The staged training engine: one loop for every stage kind, one process or many (torchrun).

Layout of a run folder:
    <out>/config.json                 the resolved RunConfig
    <out>/data/                       ShapesWorld shards (written on first use)
    <out>/<stage>/checkpoints/step_*  full training state, atomic, the last `keep_last` kept
    <out>/<stage>/log.jsonl           one line per logged step (step, loss, grad_norm, lr, samples/s)
    <out>/<stage>/tb/                 TensorBoard scalars and sample grids
    <out>/<stage>/samples/            sample grids of generation stages
    <out>/<stage>/model/              the model after the stage, release layout (the next stage starts here)
    <out>/final -> <last stage>/model

Resume: run the same command again. Finished stages (their model/ exists) are skipped; the current stage
restarts from its latest checkpoint, with the same data order and random draws, so the losses continue as
if the run had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from blip3o.models.blip3o import Blip3o, Blip3oConfig
from blip3o.models.dit_depth import deepen
from blip3o.train.checkpoint import (
    gather_model_state_dict,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from blip3o.train.config import ConfigError, RunConfig, StageConfig
from blip3o.train.data import (
    BatchPlan,
    DataError,
    Example,
    ensure_shards,
    instruct_examples,
    load_shards,
    make_batch,
)
from blip3o.train.evaluate import evaluate_run
from blip3o.train.optim import EMA, build_optimizer, warmup_cosine
from blip3o.train.parallelize import (
    DistInfo,
    all_reduce_mean,
    barrier,
    clip_grad_norm,
    init_distributed,
    parallelize,
    seed_everything,
    shutdown_distributed,
    unwrap,
)
from blip3o.train.stages import (
    GENERATION_KINDS,
    NEEDS_CLIP_FEATURES,
    StageModule,
    fit_feature_statistics,
    fit_vae_scaling,
    parameters_of,
    set_trainable,
    shard_units,
)
from blip3o.viz import image_grid

log = logging.getLogger("blip3o.train")

# Fixed prompts for the sample grids written during generation stages (none is an evaluation prompt).
SAMPLE_PROMPTS = (
    "a red circle",
    "two blue stars",
    "a green triangle above a yellow square",
    "three black crosses",
    "an image of a purple star left of an orange circle",
    "a pink square and a blue triangle",
    "four green circles",
    "a yellow cross below a red star",
)
STATS_IMAGES = 1024  # images used to fit the CLIP feature normalisation / VAE scaling


@dataclass
class StageResult:
    name: str
    steps_run: int
    final_loss: float | None
    seconds: float
    model_dir: Path
    end_step: int = 0  # the global step the exported model has (< stage.steps when stopped by time)
    # Seconds in the optimisation loop of this call: no setup, final checkpoint or export (periodic checkpoints
    # and sample grids inside the loop do count).
    train_s: float = 0.0


def _stage_seed(config: RunConfig, index: int) -> int:
    return config.seed * 1000 + index


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _check_run_config(out: Path, config: RunConfig, dist: DistInfo) -> None:
    """A resumed run must use the same configuration; a new run records it. The saved configuration is read with
    defaults filled in, so a run saved before a field existed resumes while that field keeps its default."""
    path = out / "config.json"
    if path.exists():
        try:
            saved = json.loads(RunConfig.from_dict(json.loads(path.read_text())).to_json())
        except (TypeError, KeyError, ValueError):  # a field this version no longer has, or an invalid value
            saved = None
        if saved != json.loads(config.to_json()):
            raise ConfigError(
                f"{out} holds a run with a different configuration ({path}); use a new --out folder "
                "or the same preset and overrides to resume"
            )
    elif dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, json.loads(config.to_json()))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys ("backbone.num_layers"), the form overrides are written in."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stage_examples(stage: StageConfig, config: RunConfig, shard_examples: list[Example]) -> list[Example]:
    """What a stage trains on: stage 3's prompt renders for instruct stages and decoder stages with
    `prompt_scenes`, the run's shards for every other stage."""
    if stage.kind != "instruct" and not stage.prompt_scenes:
        return shard_examples
    return instruct_examples(
        config.data.seed,
        config.data.instruct_renders,
        config.data.instruct_max_prompts or None,
        stage.colourless_pair_renders,
        stage.counting_renders,
    )


def check_stage_model(model_dir: Path, wanted: Blip3oConfig) -> None:
    """A finished stage's model must be the run's model. A stage folder copied in from another run would
    otherwise be resumed from silently, and every later stage would train that run's model, whatever this
    run's config says. Fields the run leaves to be resolved at build time (None) are not compared."""
    saved = Blip3oConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    check_model_config(saved, wanted, str(model_dir), STAGE_FOLDER_ADVICE)


STAGE_FOLDER_ADVICE = (
    "It was not trained by this run: remove the stage folder, or fill it with tools/reuse_backbone.py or "
    "tools/reuse_target.py, which rebuild the model from the run's config, or tools/reuse_model.py, which checks "
    "its source against it"
)


def check_model_config(saved: Blip3oConfig, wanted: Blip3oConfig, where: str, advice: str) -> None:
    """`check_stage_model` for a config in memory; `where` names the model in the error, `advice` says what to do."""
    flat = _flat(asdict(saved))
    differing = [
        f"{key} {flat.get(key)!r} (run: {value!r})"
        for key, value in _flat(asdict(wanted)).items()
        if value is not None and flat.get(key) != value
    ]
    if differing:
        raise ConfigError(
            f"{where} holds a model of a different configuration than this run's: "
            + ", ".join(differing[:6])
            + f". {advice}"
        )


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _truncate_log(path: Path, from_step: int) -> None:
    """Drop log lines of steps after `from_step` (a line's step counts completed steps, so the checkpoint we
    resume from, taken after `from_step` steps, already covers the line for `from_step`)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= from_step]
    path.write_text("".join(line + "\n" for line in kept))


def export_model(model: Blip3o, directory: Path) -> None:
    """Atomic release export: write to a temporary folder, then rename."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def write_samples(module, path: Path, step: int, seed: int = 0, steps: int = 10, writer=None, is_main=True):
    """Generate the fixed sample prompts (EMA weights if the caller swapped them in) and save a grid."""
    with torch.no_grad():
        images = module(
            {"prompts": list(SAMPLE_PROMPTS)}, mode="sample", steps=steps, decoder_steps=steps, seed=seed
        )
    if not is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(
        images, list(SAMPLE_PROMPTS), columns=len(SAMPLE_PROMPTS), cell=128, title=f"step {step}"
    )
    grid.save(path)
    if writer is not None:
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def train_stage(
    model: Blip3o,
    stage: StageConfig,
    index: int,
    config: RunConfig,
    out: Path,
    examples: list,
    dist: DistInfo,
    rebuild,
    progress: bool = True,
    stop_after_s: float | None = None,
) -> StageResult:
    """Train one stage of `model` in place and export it. `rebuild()` makes a fresh copy of the model as the
    stage received it (only needed to export from FSDP2 shards).

    stop_after_s: a wall-time budget for this call. After the first optimizer step at which the loop has run
    that long, the stage saves a checkpoint and exports its model as if it had ended there (EMA weights as
    usual); calling again resumes from that checkpoint. Budgeted runs (the design study) pair this with a
    huge `steps` and a constant LR after warmup (min_lr_ratio=1), so where the budget cuts is not a schedule
    end. Under several processes each rank measures its own time; pass None there unless ranks stay in step.
    """
    if stop_after_s is not None and stop_after_s < 0:
        raise ValueError(f"stop_after_s must be >= 0, got {stop_after_s}")
    stage_dir = out / stage.name
    kind = stage.kind
    start_time = time.perf_counter()
    model.to(dist.device)
    if (
        kind in NEEDS_CLIP_FEATURES
        and config.model.target == "clip"
        and not model.clip.feature_normalization_fitted
    ):
        fit_feature_statistics(model, [e.image for e in examples[:STATS_IMAGES]])
    dec = model.decoder.config
    renders_patches = (dec.spatial_upsample, dec.spatial_channels, dec.spatial_kernel) == (
        "pixel_shuffle",
        3,
        1,
    )
    first_decoder_stage = all(s.kind != "decoder" for s in config.stages[:index])
    if kind == "decoder" and model.clip.pixel_head is not None and renders_patches and first_decoder_stage:
        # The decoder's per-patch rendering branch starts as CLIP's pixel head (a resume overwrites it).
        model.decoder.init_spatial_from_clip(model.clip)
    if kind in GENERATION_KINDS and config.model.target == "vae" and not model.vae.scaling_fitted:
        fit_vae_scaling(model, [e.image for e in examples[:STATS_IMAGES]])
    examples = stage_examples(stage, config, examples)
    set_trainable(model, kind, stage.freeze_vision, stage.freeze_language)
    seed = _stage_seed(config, index)
    plan = BatchPlan(len(examples), stage.batch_size, stage.grad_accum, dist.world_size, seed)
    # Stage heads (the slot label head, the vision stage's scene head) start from the stage's seed, not from what
    # the process drew before it: a run resumed at this stage and an uninterrupted one build the same heads.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = StageModule(
            model,
            kind,
            stage.understanding_weight,
            stage.understanding_average,
            stage.cell_position_weight,
            stage.slot_label_weight,
            stage.generated_share,
            stage.generated_max_sigma,
            stage.slot_position_weight,
            stage.slot_relation_weight,
            stage.generated_pairs,
            stage.slot_binding_weight,
            stage.slot_binding_order,
            stage.count_weight,
            stage.count_by,
            scene_cosine_scale=stage.scene_cosine_scale,
            scene_embedding_weight=stage.scene_embedding_weight,
            target_tokens=stage.target_tokens,
            separation_weight=stage.separation_weight,
            separation_rows=stage.separation_rows,
            separation_margin=stage.separation_margin,
            own_count_weight=stage.own_count_weight,
            own_min_sigma=stage.own_min_sigma,
            own_count_target=stage.own_count_target,
        )
    wrapped = parallelize(module, config.distributed, dist, shard_units(model, kind), config.precision)
    # The module, not the model: it also holds the vision stage's scene head and the slot label head.
    optimizer = build_optimizer(parameters_of(module), stage.lr, stage.weight_decay)
    scheduler = warmup_cosine(optimizer, stage.warmup_steps, stage.steps, stage.min_lr_ratio)
    ema = EMA(model, stage.ema_decay) if stage.ema_decay > 0 else None
    # Diffusion draws are per sample (batch["seeds"]); this generator only drives the VAE's posterior sample.
    # Per-rank seeds come from parallelize.rank_seed (a hash), which cannot collide across seeds and ranks.
    generator = torch.Generator().manual_seed(seed_everything(seed, dist.rank))

    params = [p for p in module.parameters() if p.requires_grad]
    start_step = 0
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is not None:
        state = load_training_state(
            ckpt, wrapped, optimizer, scheduler, ema=ema, generators={"flow": generator}, dist=dist
        )
        start_step = int(state["step"])
        log.info("[%s] resumed from %s at step %d", stage.name, ckpt, start_step)
    log_path = stage_dir / "log.jsonl"
    writer = None
    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, start_step)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(stage_dir / "tb"))
        log.info(
            "[%s] kind=%s steps=%d batch=%d (micro %d x accum %d x ranks %d) trainable params=%d",
            stage.name, kind, stage.steps, stage.batch_size, plan.micro_batch, stage.grad_accum,
            dist.world_size, sum(p.numel() for p in params),
        )  # fmt: skip
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    bar = tqdm(
        total=stage.steps,
        initial=start_step,
        desc=stage.name,
        disable=not (progress and dist.is_main),
        leave=False,
    )
    window_start, window_samples, last_loss = time.perf_counter(), 0, None
    loop_start, train_s, end_step = time.perf_counter(), 0.0, stage.steps
    for step in range(start_step, stage.steps):
        wrapped.train()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=dist.device)
        step_metrics: dict[str, torch.Tensor] = {}  # a stage's own figures (vision: accuracies; joint: parts)
        for micro in range(stage.grad_accum):
            positions = plan.positions(step, micro, dist.rank)
            batch = make_batch(
                kind, examples, plan.rows(positions), positions, seed, stage.short_caption_prob,
                qa_share=stage.qa_share, hard_negatives=stage.hard_negatives, qa_turns=stage.qa_turns,
                location_questions=stage.location_questions, axis_questions=stage.axis_questions,
                relation_steps=stage.relation_steps, relation_share=stage.relation_share,
                relation_form=stage.relation_form,
            )  # fmt: skip
            sync = micro == stage.grad_accum - 1 or config.distributed != "ddp"
            with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast:
                loss, metrics = wrapped(batch, generator)
            (loss / stage.grad_accum).backward()
            step_loss += loss.detach().float() / stage.grad_accum
            for key, value in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value.detach().float() / stage.grad_accum
        grad_norm = clip_grad_norm(params, stage.grad_clip if stage.grad_clip > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        window_samples += stage.batch_size
        done = step + 1
        train_s = time.perf_counter() - loop_start
        stopping = stop_after_s is not None and train_s >= stop_after_s and done < stage.steps
        if done % stage.log_every == 0 or done == stage.steps or stopping:
            last_loss = all_reduce_mean(step_loss, dist)
            extra = {key: all_reduce_mean(value, dist) for key, value in step_metrics.items()}
            elapsed = time.perf_counter() - window_start
            rate = window_samples / max(elapsed, 1e-9)
            eta = (stage.steps - done) * stage.batch_size / max(rate, 1e-9)
            lr = scheduler.get_last_lr()[0]
            if dist.is_main:
                record = {
                    "step": done,
                    "loss": last_loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "samples_per_s": rate,
                    **extra,
                }
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if stop_after_s is not None:  # a time budget ends the call: show that instead of steps
                    where, eta = f"step {done}", min(eta, max(stop_after_s - train_s, 0.0))
                else:
                    where = f"step {done}/{stage.steps}"
                line = (
                    f"[{stage.name}] {where} | loss {last_loss:.4f} | grad {grad_norm:.3f} | "
                    f"lr {lr:.2e} | {rate:.1f} samples/s | eta {_format_eta(eta)}"
                    + "".join(f" | {key} {value:.3f}" for key, value in extra.items())
                )
                bar.write(line) if progress else log.info(line)
                for key in ("loss", "grad_norm", "lr", "samples_per_s", *extra):
                    writer.add_scalar(f"{stage.name}/{key}", record[key], done)
            window_start, window_samples = time.perf_counter(), 0
        bar.update(1)
        if (
            kind in GENERATION_KINDS
            and stage.sample_every
            and done % stage.sample_every == 0
            and done < stage.steps
        ):
            _sample_grid(
                wrapped, model, ema, stage_dir / "samples" / f"step_{done:06d}.png", done, writer, dist
            )
        if done % stage.ckpt_every == 0 or done == stage.steps or stopping:
            save_training_state(
                stage_dir, done, wrapped, optimizer, scheduler, ema=ema, data_state={"step": done},
                generators={"flow": generator}, config=json.loads(config.to_json()), keep_last=config.keep_last,
                dist=dist, trainable_only=True,
            )  # fmt: skip
        if stopping:
            end_step = done
            log.info("[%s] time budget of %.0f s reached at step %d", stage.name, stop_after_s, done)
            break
    bar.close()

    # The stage's model: EMA weights where there is an EMA (sampling uses them), exported in release layout.
    if ema is not None:
        ema.copy_to(model)
    if kind in GENERATION_KINDS and stage.sample_every:
        _sample_grid(
            wrapped,
            model,
            None,
            stage_dir / "samples" / f"step_{end_step:06d}.png",
            end_step,
            writer,
            dist,
        )
    if config.distributed == "fsdp":
        # Sharded weights: gather them on every rank (a collective), then rank 0 writes an unsharded copy.
        state = gather_model_state_dict(wrapped)
        if dist.is_main:
            plain = rebuild()
            # Only the model's weights: the stage module's scaffolding heads (scene, slot labels) are not exported.
            weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            plain.load_state_dict(weights, strict=True)
            export_model(plain, stage_dir / "model")
    elif dist.is_main:
        export_model(unwrap(wrapped).model, stage_dir / "model")
    wall_s = time.perf_counter() - start_time
    if dist.is_main:
        writer.close()
        # Read by `blip3o card`. A resumed stage reports the time of its last session only, and says so.
        summary = {"steps_run": end_step - start_step, "resumed_at": start_step, "end_step": end_step,
                   "wall_s": wall_s, "train_s": train_s,
                   "final_loss": None if last_loss is None else float(last_loss)}  # fmt: skip
        write_json_atomic(stage_dir / "stage_summary.json", summary)
    barrier(dist)
    return StageResult(
        stage.name, end_step - start_step, last_loss, wall_s, stage_dir / "model", end_step, train_s
    )


def _sample_grid(wrapped, model, ema, path, step, writer, dist) -> None:
    wrapped.eval()
    context = ema.swapped_in(model) if ema is not None else contextlib.nullcontext()
    with context:
        write_samples(wrapped, path, step, writer=writer, is_main=dist.is_main)


def run(config: RunConfig, out: str | Path, progress: bool = True, device: str = "auto") -> list[StageResult]:
    """Train every stage of `config` into `out`, resuming where a previous run of the same config stopped."""
    out = Path(out)
    dist = init_distributed(device)
    try:
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        _check_run_config(out, config, dist)
        barrier(dist)
        if config.data.shards:  # the user's shards: never written by the run
            shard_dir = Path(config.data.shards)
            if not shard_dir.exists():
                raise DataError(
                    f"data.shards={shard_dir} does not exist (write shards with `blip3o world shards`)"
                )
        else:  # the run's own shards, written on first use
            shard_dir = out / "data"
            ensure_shards(
                shard_dir,
                config.data.num_samples,
                config.data.seed,
                dist.is_main,
                lambda: barrier(dist),
                progress=progress,
            )
        examples, _ = load_shards(shard_dir)
        results, previous = [], None
        for index, stage in enumerate(config.stages):
            model_dir = out / stage.name / "model"
            if (model_dir / "config.json").exists():
                check_stage_model(model_dir, config.stage_model(stage.name))
                log.info("[%s] already trained: %s", stage.name, model_dir)
                previous = model_dir
                continue

            def build(
                source: Path | None = previous, copies: tuple[int, ...] = stage.deepen_dit_after
            ) -> Blip3o:
                """The model as this stage receives it: the previous stage's export, or a fresh one; its DiT
                deepened first where the stage says so."""
                model = (
                    Blip3o.from_pretrained(source)
                    if source
                    else Blip3o.from_config(config.model, config.seed)
                )
                return deepen(model, copies) if copies else model

            model = build()
            results.append(train_stage(model, stage, index, config, out, examples, dist, build, progress))
            previous = model_dir
            del model
        if dist.is_main and previous is not None:
            final = out / "final"
            if final.is_symlink() or final.exists():
                final.unlink()
            final.symlink_to(previous.relative_to(out), target_is_directory=True)
        if dist.is_main and previous is not None:
            evaluate_run(config.eval, out / "final", out / "eval", progress)
        return results
    finally:
        barrier(dist)
        shutdown_distributed()
