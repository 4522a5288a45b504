"""What a design study runs: the variants, the shared budget and the measurement settings.

variant    target  objective       trains                              stage kind
clip_fm    CLIP    flow matching   queries + DiT (backbone frozen)     generation   (BLIP3-o)
clip_mse   CLIP    MSE regression  queries + DiT (backbone frozen)     generation   (Emu2 / MetaMorph)
vae_fm     VAE     flow matching   VAE first (its own budget), then    vae, generation (MetaQuery)
                                   queries + DiT on its latents
joint      CLIP    flow matching   backbone + queries + DiT, with the  joint
                                   understanding loss mixed in
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from blip3o.models.vae import VAE_PRESETS


class StudyError(ValueError):
    """Bad study settings, or an output folder that holds a different study."""


@dataclass(frozen=True)
class Variant:
    name: str
    label: str  # the paper's name for the design
    target: str  # "clip" or "vae"
    objective: str  # "flow_matching" or "mse"
    kind: str  # the budgeted stage's kind


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("clip_fm", "CLIP + flow matching (BLIP3-o)", "clip", "flow_matching", "generation"),
        Variant("clip_mse", "CLIP + MSE regression", "clip", "mse", "generation"),
        Variant("vae_fm", "VAE + flow matching", "vae", "flow_matching", "generation"),
        Variant("joint", "joint: CLIP + flow matching, backbone unfrozen", "clip", "flow_matching", "joint"),
    )
}

# Diversity prompts: fixed, simple, none of them an evaluation prompt (the training loop's sample prompts).
DIVERSITY_PROMPTS = (
    "a red circle",
    "two blue stars",
    "a green triangle above a yellow square",
    "three black crosses",
)


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's numbers. A resumed study must have the same values (`out` aside)."""

    budget_minutes: float  # training wall time of each variant's budgeted stage
    base: str  # model folder whose CLIP, decoder and backbone every variant shares
    variants: tuple[str, ...] = tuple(VARIANTS)
    points: int = 4  # measurements per variant, at equal fractions of the budget
    vae_minutes: float = 5.0  # vae_fm's VAE training (its stage 0), not counted in budget_minutes
    vae_preset: str = "tiny"  # VAE_PRESETS name: "tiny" is 16x16x4 latents = 256 DiT tokens
    geneval_prompts: int = 60  # category-balanced ShapesGenEval subset
    images_per_prompt: int = 2
    vqa_questions: int = 300
    diversity_prompts: int = 4  # the first N of DIVERSITY_PROMPTS
    diversity_samples: int = 8  # images per diversity prompt
    sample_steps: int | None = None  # DiT sampling steps (None: the model's default)
    decoder_steps: int | None = None  # pixel-decoder steps (None: the model's default)
    num_samples: int = 20_000  # ShapesWorld shards written for the study (world seed 0, as the base recipe)
    shards: str = ""  # existing shards to use instead (not written by the study)
    seed: int = 0  # DiT / query init, data order, sampling seeds
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    understanding_weight: float = 1.0  # joint: weight of the understanding loss
    qa_share: float = 0.8  # joint: share of question/answer samples in its understanding data
    vae_lr: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.budget_minutes > 0:
            raise StudyError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if not self.variants:
            raise StudyError("need at least one variant")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise StudyError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise StudyError(f"variants repeat: {list(self.variants)}")
        if "vae_fm" in self.variants and not self.vae_minutes > 0:
            raise StudyError(f"--vae-minutes must be > 0, got {self.vae_minutes}")
        if self.vae_preset not in VAE_PRESETS:
            raise StudyError(f"unknown VAE preset {self.vae_preset!r}; known: {', '.join(VAE_PRESETS)}")
        for key in ("points", "geneval_prompts", "images_per_prompt", "vqa_questions", "diversity_prompts",
                    "num_samples", "batch_size"):  # fmt: skip
            if getattr(self, key) < 1:
                raise StudyError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.diversity_prompts <= len(DIVERSITY_PROMPTS):
            raise StudyError(f"diversity_prompts must be in [1, {len(DIVERSITY_PROMPTS)}]")
        if self.diversity_samples < 2:
            raise StudyError(f"diversity_samples must be >= 2, got {self.diversity_samples}")
        for key in ("sample_steps", "decoder_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise StudyError(f"{key} must be >= 1, got {getattr(self, key)}")

    @property
    def segment_s(self) -> float:
        """Training seconds between two measurement points."""
        return self.budget_minutes * 60.0 / self.points

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        return d
