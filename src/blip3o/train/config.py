"""Training configuration: the typed dataclasses a run is made of.

Named presets are in train/presets.py, `key=value` overrides of them in train/overrides.py.

A run is a model config plus an ordered list of stages. Stages are configuration, not forks of a script:
each names its kind (what it trains and on which data) and its optimisation settings.

    stage kinds                trains                         data
    clip          (stage 0)    the CLIP target encoder        ShapesWorld shards: image + caption
    decoder       (stage 0)    the pixel decoder               shards: image (+ its own CLIP features)
    vision        (stage 0)    the backbone's vision tower     shards: image + scene labels (scene_supervision.py)
    vae           (stage 0)    the VAE (study variant)         shards: image
    understanding (stage 1)    the backbone                    shards: image + caption / question -> answer
    generation    (stage 2)    queries + DiT, backbone frozen  shards: caption -> image (10% short captions)
    instruct      (stage 3)    queries + DiT, backbone frozen  GenEval-style training prompts, rendered
    joint         (study)      backbone + queries + DiT        generation loss + understanding loss
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from blip3o.models.backbone import LOSS_AVERAGES, LossAverage
from blip3o.models.blip3o import Blip3oConfig
from blip3o.models.dit_depth import layer_plan
from blip3o.train.slot_supervision import SLOT_ORDERS
from blip3o.world.reasoning import RELATION_FORMS

StageKind = Literal["clip", "decoder", "vae", "vision", "understanding", "generation", "instruct", "joint"]
STAGE_KINDS: tuple[str, ...] = (
    "clip",
    "decoder",
    "vae",
    "vision",
    "understanding",
    "generation",
    "instruct",
    "joint",
)
Strategy = Literal["none", "ddp", "fsdp"]
Precision = Literal["fp32", "bf16"]


class ConfigError(ValueError):
    """A bad run configuration (unknown preset or key, wrong type, inconsistent values)."""


# What an instruct stage's own count loss pulls the own reading towards: the scene's counts ("estimate"), or, by
# the finished sample's miscount, the way that mends it ("outcome"; count_supervision.outcome_shape_count_error)
OWN_COUNT_TARGETS = ("estimate", "outcome")


@dataclass(frozen=True)
class StageConfig:
    name: str  # unique within a run; also the stage's folder name
    kind: StageKind
    steps: int
    batch_size: int  # global batch (all ranks, all accumulation micro-steps)
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0  # on by default, as in the release; 0 disables
    ema_decay: float = 0.0  # 0 = no EMA; generation stages sample with the EMA weights when enabled
    short_caption_prob: float = 0.1  # generation data: share of short captions (the release: ~10%)
    understanding_weight: float = 1.0  # joint: weight of the understanding loss
    # understanding / joint: "token" (mean over all answer tokens) or "sample" (each sample's mean, then the mean
    # over samples: one-word VQA answers weigh as much as 100-token captions; see Backbone.understanding_loss)
    understanding_average: LossAverage = "token"
    qa_share: float = 0.5  # understanding data: share of question/answer samples (the rest: captioning)
    # understanding / joint: questions per question sample; > 1 makes it a conversation of up to that many of
    # the image's questions, every answer trained in one pass (LLaVA-style multi-turn data)
    qa_turns: int = 1
    # understanding / joint: add "where is the <object>?" (row and column) to each image's questions, a kind
    # ShapesVQA does not ask (world/language.location_questions)
    location_questions: bool = False
    # understanding / joint: add, for each of an image's relation questions, its first-order twin "is the red
    # circle left or right of the blue star?" -> "left" / "right" / "level" (world/language.axis_questions), a
    # training-only kind. Without it the yes / no of a relation is an XOR this language model never starts on.
    axis_questions: bool = False
    # understanding / joint: train relation answers with their steps written out (world/reasoning.relation_steps,
    # truth form): "red cross bottom left, purple circle middle centre, red cross left of purple circle, so no";
    # evaluation scores the part after the last ", so " (world/reasoning.final_answer). Session 48: on fixed
    # object-centric tokens, relation questions alone, ShapesVQA's relations 0.953 (plain answers: chance); and
    # 2,000 such steps, then 4,000 of the mix with relation_share 0.3: ShapesVQA 0.980 (bench/oracle_tokens.py;
    # not yet run on a tower's tokens or in a recipe, so off in every preset).
    relation_steps: bool = False
    # understanding / joint: with relation_steps, the form of the spelled-out relation answers
    # (world/reasoning.RELATION_FORMS): "truth" (above), "compare" (the asked relation written again before the
    # answer) or "canonical" (asked the way round whose relation is "above" / "left of", so the answer follows
    # from the written relation alone). Session 50: with "truth" every recipe run answered "yes" where the
    # relation that holds is the opposite of the asked one.
    relation_form: str = "truth"
    # understanding / joint: chance that a question sample asks only its image's relation questions (plus their
    # twins and where-questions when those are on), where the image has any (else its usual ones: ~35% of a share
    # falls back). Drawing an image that has some instead was tried (session 49, runs/s49/v2d): ShapesVQA 0.804
    # against 0.948, count of a shape and existence collapsed (0.470, 0.570), so it was reverted. 0: off.
    relation_share: float = 0.0
    # understanding / joint: keep the vision tower frozen (as LLaVA-style stage 1 does), e.g. after a "vision"
    # stage, whose shape encoding the language-model loss otherwise wears away (bench/vision_probe.py)
    freeze_vision: bool = False
    # understanding: keep the language model frozen, so only the vision tower (and its patch merger)
    # learns from the answers. Text-only prompts then give bit-identical hidden states: a stage that tunes
    # understanding after the generation stages leaves what generation reads, and so every image, unchanged.
    freeze_language: bool = False
    hard_negatives: bool = False  # clip: add each caption with a shape swapped as a negative (NegCLIP-style)
    # vision: weight of the cell-position loss, each token regressing its own cell's centre (0: off). The
    # Qwen2.5-VL tower has rotary positions only, so without it a token's content hardly says where it is
    # (see scene_supervision.py; it did not lift ShapesVQA's relation questions, so the recipe keeps it off).
    cell_position_weight: float = 0.0
    # vision: 0 keeps the scene head's shape and colour classifiers linear; > 0 makes them cosine classifiers
    # with this logit scale (unit token, unit class vectors), so the token's direction, not a small component of
    # it, must name its shape and colour. Why: after the linear head, shape explains 16% of an object token's
    # variance and colour 66% (the bundle), and the language model looks objects up by colour (0.96-0.98) far
    # better than by shape (0.72-0.77). Tried at 10 (session 43): shape's share rose to 0.35, colour-of-a-named-
    # shape did not move after 8,000 understanding steps (docs/bench/understanding_position_trials.txt); off.
    scene_cosine_scale: float = 0.0
    # vision: weight of a loss that makes every merged token regress a fixed object-centric embedding of its cell
    # (scene_supervision.SceneEmbeddingTable: fixed random row, column, shape, colour and third-of-canvas vectors,
    # summed), the perfect tokens of bench/oracle_tokens.py held fixed. Session 47, 9,000 steps at 1: a 4,000-step
    # stage 1 on its tokens reached ShapesVQA 0.811 (colour of a named shape 0.940, count of a shape 0.847) where the
    # recipe's tower gave 0.740, but places stay unread (where-questions 0.39; session 48: the target itself is read,
    # 1.000, but a 5,000-step tower's tokens still are not, 0.397). Off until a recipe chain is run.
    scene_embedding_weight: float = 0.0
    # understanding: chance that a training image's vision tokens are the fixed scene-embedding target itself
    # (scene_supervision.SceneEmbeddingTable, what a vision stage with scene_embedding_weight regresses) instead of
    # the frozen tower's approximation of it; evaluation and inference always read the tower. Why: a language
    # model learns to read the crisp target far faster than the tower's soft version of it, and what it learns
    # carries over (session 49, bench/oracle_tokens.py: an LM trained 2,000 relation steps on the target read a
    # 5,000-step tower's places right in 251 of 300 replies; one trained the same steps on that tower, 151). Half
    # and half reads the tower best: shapes-object-v2's understanding stages through a 9,000-step tower, ShapesVQA
    # 0.902 at 1.0 and 0.948 at 0.5 (bench loop: 0.956 at 0.5). Needs freeze_vision and an earlier vision stage
    # with scene_embedding_weight. 0: off.
    target_tokens: float = 0.0
    # generation / instruct: weight of the scaffolding loss that makes slot k of the DiT's condition resampler
    # name the caption's k-th object (train/slot_supervision.py; needs model.dit.condition_slots > 0). 0: off.
    slot_label_weight: float = 0.0
    # generation / instruct: weight of a second scaffolding loss, slot k regressing where its object sits in the
    # image (slot_supervision.SlotLabelHead.position_loss), meant to make the slots carry relations. 0: off.
    # Tried once at 5.0 in stage 2 of shapes-object (session 23): the regression never beat a constant (mean
    # error ~0.19 of the image throughout) and label_judge fell from 0.280 to 0.195, so every preset keeps 0.
    slot_position_weight: float = 0.0
    # generation / instruct: weight of a third one, each object's slot classifying its side of a two-object
    # position phrase ("a circle left of a star": slot 1 "left of", slot 2 "right of"; other captions' objects
    # "none"; slot_supervision.caption_slot_relations), to make the two objects' own tokens carry the relation
    # (bench/condition_probe.py --split prompts on the session-23 bundle: read at 1.000 from the query states,
    # 0.995 from all slots, 0.839 from slots 1-2). 0: off.
    slot_relation_weight: float = 0.0
    # generation / instruct: weight of a loss on the DiT's cross-attention (slot_supervision.slot_binding_loss):
    # at the token holding the k-th named object of a scene with two or more, each layer's head-mean attention
    # over the objects' slots is trained to pick slot k (TokenCompose-style grounding). Without it, prompts with
    # no colours route an object's token to its own slot weakly (bench/slot_binding.py, session 32) and the
    # DiT often draws the first shape twice. Needs the scenes (shards, stage 3) and the resampler. 0: off.
    slot_binding_weight: float = 0.0
    # Which of several identical named objects ("three stars") is slot k's for the binding loss: "scene", the
    # scene's own (random) order, so the loss cannot tell them apart; "left_to_right", slot k is the k-th from
    # the left, so each slot can claim one object of a count (slot_supervision.SLOT_ORDERS).
    slot_binding_order: str = "scene"
    # decoder: share of samples whose condition is the DiT's own rendition of the image's CLIP target (noised
    # to a start level, sampled back with the caption: `Blip3o.regenerate_target`) instead of the real target,
    # so the decoder learns to draw what the DiT makes. Needs a trained DiT: an earlier generation stage.
    generated_share: float = 0.0
    # decoder: the highest start level of those renditions; levels are drawn from 4 evenly spaced up to it
    # (higher: more of the DiT's own making, less tied to the image the decoder must draw)
    generated_max_sigma: float = 0.6
    # decoder, with generated_share: what the decoder learns to draw from a rendition. "image": the batch's own
    # image (the rendition keeps its layout up to start levels of ~0.6). "reading": the ShapesWorld render of what
    # CLIP's object label head reads in the rendition (`scene_supervision.object_label_scene`), a valid pair at
    # any start level up to 1 (the DiT's own samples): the decoder learns to draw each token's object cleanly.
    generated_pairs: str = "image"
    # decoder: train on stage 3's prompt renders (`instruct_examples`: each GenEval-style training prompt's scene,
    # exactly what it asks for) instead of the shards, so the renditions are the DiT's drawings of such prompts
    # (four crosses close together), not of the shards' captions, which seldom ask for crowded scenes
    prompt_scenes: bool = False
    # instruct: renders of each training prompt that names two kinds of object and no colour ("an image of a
    # circle left of a square"); 0: data.instruct_renders, like every other prompt. Without colours the DiT often
    # draws the first shape twice (docs/bench/object_target.txt, session 30); these prompts are 300 of the 1,720.
    colourless_pair_renders: int = 0
    # instruct: renders of each counting training prompt ("a photo of three stars"); 0: data.instruct_renders.
    # These prompts are 165 of the 1,720 (7% of the renders) and counting is the weakest category; the DiT
    # draws too many objects of the named shape (bench/token_category.py, session 33).
    counting_renders: int = 0
    # instruct stages: weight of the count loss on the guided clean-target estimate (train/count_supervision.py;
    # needs CLIP's object label head)
    count_weight: float = 0.0
    # what the count loss counts: "objects" (the scene's total) or "shape" (each shape's number of objects)
    count_by: str = "objects"
    # instruct stages: weight of the separation loss (train/separation_supervision.py): on the model's own
    # sampling trajectory, two read objects whose boxes come closer than ShapesWorld's 2 px cost the shortfall
    # (the decoder draws them as one); `separation_rows` rows of each batch are sampled for it
    separation_weight: float = 0.0
    separation_rows: int = 4
    # px between two read boxes below which the separation loss costs: ShapesWorld keeps >= 2 px, but the decoder
    # still merges or drops objects the DiT draws 1.5-2.4 px apart (session 57), so a wider margin may help
    separation_margin: float = 2.0
    # instruct stages: weight of the count loss by shape read on the same own-trajectory rows (the count loss
    # above reads noised real targets, whose layouts never hold the extra objects the sampler makes)
    own_count_weight: float = 0.0
    # the own-trajectory losses' step is drawn among the sampler's steps whose noise level is >= this (0: every
    # step). The count is decided early: the guided estimate's rounded count at sigma 0.7 already is the final
    # sample's in 77 of 90 counting samples (session 56, bench/count_trajectory.py)
    own_min_sigma: float = 0.0
    # what the own count loss pulls the own reading towards: "estimate", the scene's counts; "outcome", the way
    # that mends the finished sample's miscount (the trajectory is sampled to its end for it, without gradient):
    # the estimate part-way under-reads, and pulling it to the scene's count over-counts in the end (session 59)
    own_count_target: str = "estimate"
    log_every: int = 10
    ckpt_every: int = 100
    sample_every: int = 0  # generation stages: a sample grid every N steps and at the end (0: none)
    # before this stage trains: insert after each of these DiT layers a copy of it with its adaLN gates at zero
    # (models/dit_depth.py: the same samples until training opens them, len() more layers from here on)
    deepen_dit_after: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "deepen_dit_after", tuple(int(i) for i in self.deepen_dit_after))
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"stage {self.name!r}: unknown kind {self.kind!r}; known: {STAGE_KINDS}")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "qa_turns"):
            if getattr(self, key) < 1:
                raise ConfigError(f"stage {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"stage {self.name!r}: batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"stage {self.name!r}: ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.short_caption_prob <= 1.0:
            raise ConfigError(f"stage {self.name!r}: short_caption_prob must be in [0, 1]")
        if self.understanding_average not in LOSS_AVERAGES:
            raise ConfigError(
                f"stage {self.name!r}: understanding_average must be one of {LOSS_AVERAGES}, "
                f"got {self.understanding_average!r}"
            )
        if not 0.0 <= self.qa_share <= 1.0:
            raise ConfigError(f"stage {self.name!r}: qa_share must be in [0, 1]")
        if not 0.0 <= self.relation_share <= 1.0:
            raise ConfigError(
                f"stage {self.name!r}: relation_share must be in [0, 1], got {self.relation_share}"
            )
        understanding_only = {
            "qa_turns": self.qa_turns > 1,
            "location_questions": self.location_questions,
            "axis_questions": self.axis_questions,
            "relation_steps": self.relation_steps,
            "relation_share": self.relation_share > 0,
            "freeze_vision": self.freeze_vision,
        }
        if self.relation_form not in RELATION_FORMS:
            raise ConfigError(
                f"stage {self.name!r}: relation_form must be one of {RELATION_FORMS}, got {self.relation_form!r}"
            )
        if self.relation_form != "truth" and not self.relation_steps:
            raise ConfigError(
                f"stage {self.name!r}: relation_form is the form of the spelled-out relation answers: "
                "set relation_steps too"
            )
        for key, is_set in understanding_only.items():
            if is_set and self.kind not in ("understanding", "joint"):
                raise ConfigError(
                    f"stage {self.name!r}: {key} applies to understanding and joint stages only"
                )
        if self.freeze_language and self.kind != "understanding":
            raise ConfigError(f"stage {self.name!r}: freeze_language applies to understanding stages only")
        if self.freeze_vision and self.freeze_language:
            raise ConfigError(
                f"stage {self.name!r}: freeze_vision and freeze_language together leave nothing to train"
            )
        if self.cell_position_weight < 0:
            raise ConfigError(
                f"stage {self.name!r}: cell_position_weight must be >= 0, got {self.cell_position_weight}"
            )
        if self.cell_position_weight and self.kind != "vision":
            raise ConfigError(f"stage {self.name!r}: cell_position_weight applies to vision stages only")
        if self.scene_embedding_weight < 0:
            raise ConfigError(
                f"stage {self.name!r}: scene_embedding_weight must be >= 0, got {self.scene_embedding_weight}"
            )
        if self.scene_embedding_weight and self.kind != "vision":
            raise ConfigError(f"stage {self.name!r}: scene_embedding_weight applies to vision stages only")
        if not 0.0 <= self.target_tokens <= 1.0:
            raise ConfigError(
                f"stage {self.name!r}: target_tokens must be in [0, 1], got {self.target_tokens}"
            )
        if self.target_tokens and (self.kind != "understanding" or not self.freeze_vision):
            raise ConfigError(
                f"stage {self.name!r}: target_tokens applies to understanding stages with freeze_vision only "
                "(the tower it stands in for must not train)"
            )
        if self.scene_cosine_scale < 0:
            raise ConfigError(
                f"stage {self.name!r}: scene_cosine_scale must be >= 0, got {self.scene_cosine_scale}"
            )
        if self.scene_cosine_scale and self.kind != "vision":
            raise ConfigError(f"stage {self.name!r}: scene_cosine_scale applies to vision stages only")
        for key in (
            "slot_label_weight",
            "slot_position_weight",
            "slot_relation_weight",
            "slot_binding_weight",
        ):
            weight = getattr(self, key)
            if weight < 0:
                raise ConfigError(f"stage {self.name!r}: {key} must be >= 0, got {weight}")
            if weight and self.kind not in ("generation", "instruct"):
                raise ConfigError(
                    f"stage {self.name!r}: {key} applies to generation and instruct stages only"
                )
        if self.slot_binding_order not in SLOT_ORDERS:
            raise ConfigError(
                f"stage {self.name!r}: slot_binding_order must be one of {', '.join(SLOT_ORDERS)}, "
                f"got {self.slot_binding_order!r}"
            )
        if self.slot_binding_order != "scene" and not self.slot_binding_weight:
            raise ConfigError(
                f"stage {self.name!r}: slot_binding_order applies only with slot_binding_weight > 0"
            )
        if not 0.0 <= self.generated_share <= 1.0:
            raise ConfigError(
                f"stage {self.name!r}: generated_share must be in [0, 1], got {self.generated_share}"
            )
        if self.generated_share and self.kind != "decoder":
            raise ConfigError(f"stage {self.name!r}: generated_share applies to decoder stages only")
        if self.generated_pairs not in ("image", "reading"):
            raise ConfigError(
                f"stage {self.name!r}: generated_pairs must be image or reading, got {self.generated_pairs!r}"
            )
        if not 0.0 < self.generated_max_sigma <= 1.0:
            raise ConfigError(
                f"stage {self.name!r}: generated_max_sigma must be in (0, 1], got {self.generated_max_sigma}"
            )
        if self.count_by not in ("objects", "shape"):
            raise ConfigError(
                f"stage {self.name!r}: count_by must be objects or shape, got {self.count_by!r}"
            )
        # losses on the guided estimate: instruct only
        for name in ("count_weight", "separation_weight", "own_count_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stage {self.name!r}: {name} must be >= 0, got {getattr(self, name)}")
            if getattr(self, name) and self.kind != "instruct":
                raise ConfigError(f"stage {self.name!r}: {name} applies to instruct stages only")
        if not 0.0 <= self.own_min_sigma < 1.0:
            raise ConfigError(
                f"stage {self.name!r}: own_min_sigma must be in [0, 1), got {self.own_min_sigma}"
            )
        if self.own_count_target not in OWN_COUNT_TARGETS:
            raise ConfigError(
                f"stage {self.name!r}: own_count_target must be one of {OWN_COUNT_TARGETS}, "
                f"got {self.own_count_target!r}"
            )
        if self.separation_margin <= 0:
            raise ConfigError(
                f"stage {self.name!r}: separation_margin must be > 0 px, got {self.separation_margin}"
            )
        if self.separation_rows < 1:
            raise ConfigError(
                f"stage {self.name!r}: separation_rows must be >= 1, got {self.separation_rows}"
            )
        if self.prompt_scenes and self.kind != "decoder":
            raise ConfigError(f"stage {self.name!r}: prompt_scenes applies to decoder stages only")
        for name in ("colourless_pair_renders", "counting_renders"):
            if getattr(self, name) < 0:
                raise ConfigError(f"stage {self.name!r}: {name} must be >= 0")
            if getattr(self, name) and self.kind != "instruct" and not self.prompt_scenes:
                raise ConfigError(
                    f"stage {self.name!r}: {name} applies to instruct stages and decoder stages with prompt_scenes"
                )
        if self.hard_negatives and self.kind != "clip":
            raise ConfigError(f"stage {self.name!r}: hard_negatives applies to clip stages only")


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # folder of ShapesWorld shards; empty: <out>/data, written on first use
    num_samples: int = 20_000  # samples to write when the shards are created by the run
    seed: int = 0  # world seed of the shards
    instruct_renders: int = 4  # renders per GenEval-style training prompt (stage 3)
    instruct_max_prompts: int = 0  # use only the first N training prompts (0: all of them)

    def __post_init__(self) -> None:
        if self.instruct_renders < 1 or self.instruct_max_prompts < 0:
            raise ConfigError("data.instruct_renders must be >= 1 and data.instruct_max_prompts >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """What a run evaluates once every stage is trained (rank 0, on the final model, into <out>/eval)."""

    geneval_seeds: tuple[int, ...] = ()  # ShapesGenEval sampling seeds; empty: no GenEval
    geneval_max_prompts: int = 0  # a category-balanced subset of the 560 prompts (0: all of them)
    geneval_images_per_prompt: int = 0  # cap on each prompt's images (0: the benchmark's n_samples)
    # ShapesVQA questions: -1 none, 0 the full 2,100-question set, N an N-question set.
    vqa_questions: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "geneval_seeds", tuple(int(s) for s in self.geneval_seeds))
        if self.geneval_max_prompts < 0 or self.geneval_images_per_prompt < 0:
            raise ConfigError("eval.geneval_max_prompts and eval.geneval_images_per_prompt must be >= 0")
        if self.vqa_questions < -1:
            raise ConfigError(f"eval.vqa_questions must be -1, 0 or a count, got {self.vqa_questions}")

    @property
    def enabled(self) -> bool:
        return bool(self.geneval_seeds) or self.vqa_questions >= 0


def migrate_saved_config(d: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (a `RunConfig.to_dict()`) in this code's field layout; `d` itself is left unchanged.
    Sessions 30-31 saved `data.instruct_colourless_pair_renders`, read by every instruct stage: it is each
    instruct stage's `colourless_pair_renders` now."""
    data = dict(d.get("data", {}))
    legacy_renders = data.pop("instruct_colourless_pair_renders", 0)
    stages = [dict(s) for s in d["stages"]]
    for s in stages:
        if legacy_renders and s["kind"] == "instruct" and not s.get("colourless_pair_renders"):
            s["colourless_pair_renders"] = legacy_renders
    return {**d, "data": data, "stages": stages}


@dataclass(frozen=True)
class RunConfig:
    preset: str
    model: Blip3oConfig
    stages: tuple[StageConfig, ...]
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: Strategy = "none"
    precision: Precision = "fp32"
    seed: int = 0
    keep_last: int = 2  # checkpoints kept per stage
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on CPU)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"distributed must be none, ddp or fsdp, got {self.distributed!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        layers = self.model.dit.n_layers
        for stage in self.stages:
            try:
                layers = len(layer_plan(layers, stage.deepen_dit_after))  # the rule `deepen` itself applies
            except ValueError as err:
                raise ConfigError(
                    f"stage {stage.name!r}: deepen_dit_after takes distinct DiT layers in 0..{layers - 1} (the "
                    f"DiT has {layers} when the stage starts), got {list(stage.deepen_dit_after)}"
                ) from err
        for index, stage in enumerate(self.stages):
            if (stage.separation_weight or stage.own_count_weight) and self.distributed == "fsdp":
                # Each rank samples its own rows up to its own drawn step: the sharded DiT would be called a
                # different number of times per rank, and FSDP's per-call all-gathers would not line up.
                raise ConfigError(
                    f"stage {stage.name!r}: separation_weight and own_count_weight sample on each rank's own "
                    "trajectory, which FSDP's sharded DiT cannot do; use distributed=ddp or none"
                )
            if stage.target_tokens and not any(
                s.kind == "vision" and s.scene_embedding_weight for s in self.stages[:index]
            ):
                raise ConfigError(
                    f"stage {stage.name!r}: target_tokens stands in for a tower trained towards the scene-embedding "
                    "target: it needs a vision stage with scene_embedding_weight > 0 before it"
                )
            if not stage.generated_share:
                continue
            if (self.model.target, self.model.objective) != ("clip", "flow_matching"):
                raise ConfigError(
                    f"stage {stage.name!r}: generated_share needs a flow-matching DiT generating CLIP targets"
                )
            if not any(s.kind in ("generation", "instruct", "joint") for s in self.stages[:index]):
                raise ConfigError(
                    f"stage {stage.name!r}: generated_share needs a trained DiT, i.e. a generation stage before it"
                )
            clip = self.model.clip
            if stage.generated_pairs == "reading" and not (
                clip.patch_label_weight and clip.patch_label_kind == "object"
            ):
                raise ConfigError(
                    f"stage {stage.name!r}: generated_pairs 'reading' needs CLIP's object label head "
                    "(model.clip.patch_label_kind 'object', patch_label_weight > 0)"
                )

    def stage_model(self, name: str) -> Blip3oConfig:
        """The model a stage trains and exports: `model` (as built), deepened by its stages up to this one."""
        names = [s.name for s in self.stages]
        if name not in names:
            raise ConfigError(f"no stage {name!r}; stages: {names}")
        added = sum(len(s.deepen_dit_after) for s in self.stages[: names.index(name) + 1])
        if not added:
            return self.model
        return replace(self.model, dit=replace(self.model.dit, n_layers=self.model.dit.n_layers + added))

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model": self.model.to_dict(),
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "data": dataclasses.asdict(self.data),
            "eval": {**dataclasses.asdict(self.eval), "geneval_seeds": list(self.eval.geneval_seeds)},
            **{
                k: getattr(self, k)
                for k in ("distributed", "precision", "seed", "keep_last", "deterministic")
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = migrate_saved_config(d)
        return cls(
            preset=d["preset"],
            model=Blip3oConfig.from_dict(d["model"]),
            stages=tuple(StageConfig(**s) for s in d["stages"]),
            data=DataConfig(**d.get("data", {})),
            eval=EvalConfig(**d.get("eval", {})),
            **{k: d[k] for k in ("distributed", "precision", "seed", "keep_last", "deterministic") if k in d},
        )
