"""Each variant's starting model and its budgeted stage, built from one shared base model.

Every variant keeps the base's CLIP (the DiT target for the CLIP variants, and the measuring instrument of all
of them), pixel decoder and backbone: the stage-0 and stage-1 artefacts. None inherits generation training: each
gets a fresh DiT and fresh latent queries, drawn from the same seed (the queries first, so they are identical in
every variant; the DiT is identical wherever its shape is).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from blip3o.models.blip3o import Blip3o
from blip3o.models.dit import DiT
from blip3o.models.vae import Vae, vae_config
from blip3o.study.config import VARIANTS, StudyConfig
from blip3o.train.config import DataConfig, RunConfig, StageConfig

BUDGETED_STEPS = 10**9  # the budgeted stages end by time, never by step count
NO_PERIODIC_CHECKPOINTS = 10**9  # only the checkpoints of time stops: one per measurement point
GENERATION_STAGE_INDEX = 2  # the stage seed's index: every variant sees the same data order and draws
VAE_STAGE = "vae"


def fresh_variant_model(base: Blip3o, variant: str, config: StudyConfig) -> Blip3o:
    """The variant's model before its budgeted stage: base CLIP, decoder and backbone, fresh queries + DiT
    (and, for vae_fm, a fresh untrained VAE with a DiT sized for its latents)."""
    spec = VARIANTS[variant]
    model_config = replace(base.config, objective=spec.objective)
    vae = None
    if spec.target == "vae":
        vae_cfg = vae_config(config.vae_preset)
        dit_cfg = replace(
            base.config.dit, in_channels=vae_cfg.latent_channels, input_size=vae_cfg.latent_size
        )
        model_config = replace(model_config, target="vae", vae=vae_cfg, dit=dit_cfg)
    torch.manual_seed(config.seed)
    base.backbone.reset_queries()  # std of the trained embedding table: the queries' scale in stage 2
    dit = DiT(model_config.dit)
    if spec.target == "vae":
        vae = Vae(model_config.vae)
    return Blip3o(model_config, base.backbone, base.clip, base.decoder, dit=dit, vae=vae)


def tokens_per_image(model: Blip3o) -> int:
    """How many tokens the DiT generates per image (its sequence length): 64 for the CLIP grid."""
    cfg = model.config.dit
    return (cfg.input_size // cfg.patch_size) ** 2


def budgeted_stage(variant: str, config: StudyConfig) -> StageConfig:
    """The variant's trained stage: constant LR after warmup and no step limit (the time budget stops it)."""
    spec = VARIANTS[variant]
    return StageConfig(
        spec.kind, spec.kind, steps=BUDGETED_STEPS, batch_size=config.batch_size, lr=config.lr,
        warmup_steps=config.warmup_steps, min_lr_ratio=1.0, ema_decay=config.ema_decay,
        understanding_weight=config.understanding_weight, qa_share=config.qa_share,
        log_every=50, ckpt_every=NO_PERIODIC_CHECKPOINTS,
    )  # fmt: skip


def vae_stage(config: StudyConfig) -> StageConfig:
    """vae_fm's stage 0: the AutoencoderKL on ShapesWorld images, for `vae_minutes`."""
    return StageConfig(
        VAE_STAGE, "vae", steps=BUDGETED_STEPS, batch_size=config.batch_size, lr=config.vae_lr,
        warmup_steps=config.warmup_steps, min_lr_ratio=1.0, log_every=50, ckpt_every=NO_PERIODIC_CHECKPOINTS,
    )  # fmt: skip


def run_config(model: Blip3o, stage: StageConfig, config: StudyConfig, shard_dir: str) -> RunConfig:
    """The RunConfig that `train_stage` reads (seed, precision, checkpoint policy, and the model's shape)."""
    return RunConfig(
        preset="study", model=model.config, stages=(stage,), data=DataConfig(shards=shard_dir),
        seed=config.seed, keep_last=2,
    )  # fmt: skip
