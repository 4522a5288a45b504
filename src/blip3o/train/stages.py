"""What each stage kind trains and how its loss is computed, on top of the single-device `Blip3o`.

`StageModule` is the thing handed to DDP / FSDP2: every computation of a step (and of in-training sampling)
goes through its `forward`, so the wrappers' hooks see it. It owns no parameters beyond the model's, except
the "vision" stage's scene head and the generation stages' slot-label head: training scaffolding that is
optimised and checkpointed with the stage but never exported. A decoder stage with `generated_share` also runs
the (frozen) DiT inside its forward, to draw the renditions it conditions on; with `generated_pairs` "reading"
it also renders, as the image to draw, the scene CLIP's label head reads in each rendition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from blip3o.models.backbone import LossAverage
from blip3o.models.blip3o import Blip3o
from blip3o.models.clip import grid_to_tokens
from blip3o.models.decoder import images_to_tensor
from blip3o.train.config import OWN_COUNT_TARGETS
from blip3o.train.count_supervision import (
    counted_error,
    guided_readings,
    outcome_shape_count_error,
    read_shape_counts,
    row_guidance_weights,
    scene_counts,
    shape_count_error,
)
from blip3o.train.scene_supervision import (
    SceneCellHead,
    SceneEmbeddingTable,
    clip_patch_labels,
    object_label_scene,
    vision_tokens_replaced,
)
from blip3o.train.separation_supervision import (
    SEPARATION_MARGIN,
    finish_own_trajectory,
    own_trajectory_readings,
    separation_error,
)
from blip3o.train.slot_supervision import SlotLabelHead, slot_binding_loss
from blip3o.transport import FlowMatchingConfig, FlowMatchingDraws, draw_flow_matching, flow_matching_loss
from blip3o.world.render import render

GENERATION_KINDS = ("generation", "instruct", "joint")
NEEDS_CLIP_FEATURES = ("decoder", "generation", "instruct", "joint")


def trainable_modules(model: Blip3o, kind: str) -> list[nn.Module | nn.Parameter]:
    """The parts a stage kind trains; everything else is frozen."""
    if kind == "clip":
        return [model.clip]
    if kind == "decoder":
        return [model.decoder]
    if kind == "vae":
        if model.vae is None:
            raise ValueError("stage kind 'vae' needs a model with a VAE (model.vae config)")
        return [model.vae]
    if kind == "understanding":
        return [model.backbone.vlm]
    if kind == "vision":
        return [model.backbone.vision_tower]
    if kind in ("generation", "instruct"):
        # The release's stage 2/3: the backbone is frozen; only the queries and the DiT learn.
        return [model.backbone.latent_queries, model.dit]
    if kind == "joint":
        return [model.backbone, model.dit]
    raise ValueError(f"unknown stage kind {kind!r}")


def set_trainable(
    model: Blip3o, kind: str, freeze_vision: bool = False, freeze_language: bool = False
) -> list[str]:
    """Freeze everything, then unfreeze what `kind` trains; returns the trainable parameter names.

    freeze_vision: keep the backbone's vision tower frozen even where `kind` trains the backbone.
    freeze_language: an understanding stage trains only the backbone's vision tower (with its patch merger); the
    language model, whose hidden states on text prompts condition generation, stays as it is."""
    model.requires_grad_(False)
    for part in trainable_modules(model, kind):
        part.requires_grad_(True)
    if freeze_language and kind == "understanding":
        model.backbone.requires_grad_(False)
        model.backbone.vision_tower.requires_grad_(True)
    if freeze_vision:
        model.backbone.vision_tower.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def shard_units(model: Blip3o, kind: str) -> list[nn.Module]:
    """Blocks that FSDP2 shards as their own units (transformer layers of the trained parts)."""
    units: list[nn.Module] = []
    if kind in GENERATION_KINDS:
        units += list(model.dit.model.layers)
    if kind in ("understanding", "joint"):
        units += list(model.backbone.vlm.model.language_model.layers)
    return units


def per_sample_draws(
    x0: torch.Tensor, condition: torch.Tensor | None, seeds: list[int], cfg: FlowMatchingConfig
) -> FlowMatchingDraws:
    """Flow-matching draws (level, noise, dropout) made per sample from its own seed.

    A sample's draws then depend only on which sample it is (its global position in the data order), not on
    how the batch is split over ranks or micro-steps: a 2-process run sees exactly the randomness of a
    1-process run, and a resumed run that of an uninterrupted one, with no generator state to carry.
    """
    parts = [
        draw_flow_matching(
            x0[i : i + 1],
            None if condition is None else condition[i : i + 1],
            torch.Generator().manual_seed(seed),
            cfg,
        )
        for i, seed in enumerate(seeds)
    ]
    masks = [p.drop_mask for p in parts]
    return FlowMatchingDraws(
        index=torch.cat([p.index for p in parts]),
        noise=torch.cat([p.noise for p in parts]),
        drop_mask=None if masks[0] is None else torch.cat(masks),
    )


def sample_stream(seed: int, stream: int) -> torch.Generator:
    """A generator of a sample's own, for one kind of draw: seeded from (its seed, `stream`), so draws of different
    kinds made from the same sample seed do not repeat one another."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))


def target_token_draws(seeds: list[int], share: float) -> torch.Tensor:
    """(B,) bool: which images of a batch read the scene-embedding target (StageConfig.target_tokens), each drawn
    from its sample's own seed (as `per_sample_draws`), so ranks and resumes see the same choice."""
    return torch.tensor([bool(torch.rand(1, generator=sample_stream(seed, 3)) < share) for seed in seeds])


def condition_noise_draws(shape: tuple[int, ...], seeds: list[int], max_std: float) -> torch.Tensor:
    """Conditioning-augmentation noise (B, ...) = per sample: std uniform in [0, max_std] times Gaussian noise.

    Drawn from each sample's own seed (as `per_sample_draws`), on a stream of its own, so it does not repeat
    the flow-matching draws made from the same seed."""
    parts = []
    for seed in seeds:
        generator = sample_stream(seed, 1)
        std = max_std * torch.rand((), generator=generator)
        parts.append(std * torch.randn(shape[1:], generator=generator))
    return torch.stack(parts)  # (B, ...)


GENERATED_SIGMA_LEVELS = 4  # start levels of the decoder's DiT renditions: max_sigma * (1, 2, 3, 4) / 4


class GeneratedTargetDraws(NamedTuple):
    use: torch.Tensor  # (B,) bool: this sample's condition is the DiT's rendition
    sigma: torch.Tensor  # (B,) its start level
    noise: torch.Tensor  # (B, ...) the noise it is started from


def generated_target_draws(
    shape: tuple[int, ...], seeds: list[int], share: float, max_sigma: float
) -> GeneratedTargetDraws:
    """Per sample, from its own seed on a stream of its own (as `condition_noise_draws`): whether the decoder
    sees the DiT's rendition of its target, from which of GENERATED_SIGMA_LEVELS start levels, and the noise."""
    use, sigma, noise = [], [], []
    for seed in seeds:
        generator = sample_stream(seed, 2)
        use.append(bool(torch.rand((), generator=generator) < share))
        level = int(torch.randint(GENERATED_SIGMA_LEVELS, (), generator=generator)) + 1
        sigma.append(max_sigma * level / GENERATED_SIGMA_LEVELS)
        noise.append(torch.randn(shape[1:], generator=generator))
    return GeneratedTargetDraws(torch.tensor(use), torch.tensor(sigma), torch.stack(noise))


def rendered_features(
    model: Blip3o, images: list, captions: list[str], draws: GeneratedTargetDraws, features: torch.Tensor
) -> torch.Tensor:
    """The decoder's conditions `features` (B, N, D) with each row where `draws.use` replaced by the DiT's
    rendition of that image's target (`Blip3o.regenerate_target`, the model's sampling steps and guidance; one DiT
    call per start level). Only those rows' targets are encoded: the others keep the conditions they were given."""
    used = torch.nonzero(draws.use).flatten().tolist()
    conditions = features.clone()
    if not used:
        return conditions
    target = model.encode_target([images[i] for i in used])  # (u, C, g, g)
    sigma, noise = draws.sigma[used], draws.noise[used]  # (u,), (u, C, g, g)
    for level in sigma.unique().tolist():
        rows = torch.nonzero(sigma == level).flatten().tolist()
        target[rows] = model.regenerate_target(
            target[rows], [captions[used[i]] for i in rows], level, noise[rows]
        )  # (r, C, g, g)
    conditions[used] = model.clip.target_to_features(grid_to_tokens(target)).to(conditions.dtype)  # (u, N, D)
    return conditions


@torch.no_grad()
def reading_images(
    model: Blip3o, features: torch.Tensor, images: list, seeds: list[int], use: torch.Tensor
) -> list:
    """`images` with each used sample's image replaced by the ShapesWorld render of what CLIP's object label head
    reads in its (B, N, D) normalised condition features (`object_label_scene`; background, noise and colour jitter
    from the sample's own seed, on a stream of its own)."""
    reading = model.clip.patch_labels_from_tokens(model.clip.denormalize_features(features))  # (B, N, 19)
    drawn = list(images)
    for row in torch.nonzero(use).flatten().tolist():
        rng = np.random.default_rng(np.random.SeedSequence([seeds[row], 3]))
        drawn[row] = render(object_label_scene(reading[row].cpu(), rng, size=images[row].width))
    return drawn


class StageModule(nn.Module):
    """forward(batch, generator) -> (loss, metrics) for one stage kind; forward(prompts, mode='sample').

    `batch["seeds"]` (one per sample) drives the diffusion draws (see `per_sample_draws`); `generator` only
    the VAE's posterior sample.
    """

    def __init__(
        self,
        model: Blip3o,
        kind: str,
        understanding_weight: float = 1.0,
        understanding_average: LossAverage = "token",
        cell_position_weight: float = 0.0,
        slot_label_weight: float = 0.0,
        generated_share: float = 0.0,
        generated_max_sigma: float = 0.6,
        slot_position_weight: float = 0.0,
        slot_relation_weight: float = 0.0,
        generated_pairs: str = "image",
        slot_binding_weight: float = 0.0,
        slot_binding_order: str = "scene",
        count_weight: float = 0.0,
        count_by: str = "objects",
        scene_cosine_scale: float = 0.0,
        scene_embedding_weight: float = 0.0,
        target_tokens: float = 0.0,
        separation_weight: float = 0.0,
        separation_rows: int = 4,
        separation_margin: float = SEPARATION_MARGIN,
        own_count_weight: float = 0.0,
        own_min_sigma: float = 0.0,
        own_count_target: str = "estimate",
    ):
        super().__init__()
        self.model = model
        self.kind = kind
        self.understanding_weight = understanding_weight
        self.understanding_average = understanding_average
        if kind == "vision":
            self.scene_head = SceneCellHead(
                model.config.backbone.hidden_size,
                cell_position_weight,
                scene_cosine_scale,
                scene_embedding_weight,
            ).to(model.device)
        # understanding: the share of images that read the scene-embedding target in place of the tower's tokens
        self.target_tokens = target_tokens
        if target_tokens > 0:
            self.target_table = SceneEmbeddingTable(model.config.backbone.hidden_size).to(model.device)
        self.generated_share, self.generated_max_sigma = generated_share, generated_max_sigma
        self.generated_pairs = generated_pairs
        self.slot_label_weight, self.slot_position_weight = slot_label_weight, slot_position_weight
        self.slot_relation_weight, self.slot_binding_weight = slot_relation_weight, slot_binding_weight
        self.slot_binding_order = slot_binding_order
        self.count_weight, self.count_by = count_weight, count_by
        self.separation_weight, self.separation_rows = separation_weight, separation_rows
        self.separation_margin = separation_margin
        self.own_count_weight, self.own_min_sigma = own_count_weight, own_min_sigma
        if own_count_target not in OWN_COUNT_TARGETS:
            raise ValueError(f"own_count_target must be one of {OWN_COUNT_TARGETS}, got {own_count_target!r}")
        self.own_count_target = own_count_target
        clip = getattr(model, "clip", None)
        if self.guided_losses and (
            clip is None or clip.label_head is None or clip.config.patch_label_kind != "object"
        ):
            raise ValueError(
                "count_weight, separation_weight and own_count_weight need a CLIP target with the object label "
                "head (patch_label_kind)"
            )
        if (self.uses_slot_head or slot_binding_weight > 0) and model.dit.resampler is None:
            raise ValueError(
                "slot_label_weight, slot_position_weight, slot_relation_weight and slot_binding_weight need "
                "the DiT's condition resampler (model.dit.condition_slots > 0)"
            )
        if self.uses_slot_head:
            width = model.config.dit.latent_embedding_size
            self.slot_head = SlotLabelHead(
                width, position=slot_position_weight > 0, relation=slot_relation_weight > 0
            ).to(model.device)

    @property
    def guided_losses(self) -> bool:
        """Whether a loss reads the guided clean-target estimate (train/count_supervision.py)."""
        return self.count_weight > 0 or self.own_trajectory_losses

    @property
    def own_trajectory_losses(self) -> bool:
        """Whether a loss reads the model's own sampling trajectory (train/separation_supervision.py)."""
        return self.separation_weight > 0 or self.own_count_weight > 0

    @property
    def uses_slot_head(self) -> bool:
        return self.slot_label_weight > 0 or self.slot_position_weight > 0 or self.slot_relation_weight > 0

    def _own_trajectory_loss(
        self, condition: Tensor, scenes: list, seed: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted separation and own count losses, both read off one sample of the model's own trajectory
        for the (R, L, H) conditions (train/separation_supervision.py). The own count loss is the count loss by
        shape taken there: the count loss on noised real targets never sees the extra objects the sampler makes
        (session 54: moving centres apart made the DiT over-count, 74 of 100 "three" prompts too many)."""
        reading = own_trajectory_readings(self.model, condition, seed, self.own_min_sigma)
        readings, sigma = reading.readings, reading.sigma  # (R, N, 19), (R,)
        everyone = torch.ones(condition.shape[0], dtype=torch.bool, device=condition.device)  # (R,)
        loss, metrics = readings.new_zeros(()), {"own_sigma": sigma[0].detach()}
        if self.separation_weight > 0:
            apart_loss, apart_metrics = separation_error(readings, everyone, self.separation_margin)
            loss, metrics = loss + self.separation_weight * apart_loss, {**metrics, **apart_metrics}
        if self.own_count_weight > 0:
            counts = scene_counts(scenes, "shape").to(condition.device)  # (R, S)
            if self.own_count_target == "outcome":
                finished = finish_own_trajectory(self.model, reading.state, sigma, condition)  # (R, C, g, g)
                with torch.no_grad():
                    finished_readings = self.model.clip.patch_labels_from_target(grid_to_tokens(finished))
                finished_counts = read_shape_counts(finished_readings)  # (R, S)
                count_loss, count_metrics = outcome_shape_count_error(
                    readings, finished_counts, counts, everyone
                )
            else:
                count_loss, count_metrics = shape_count_error(readings, counts, everyone)
            own = {f"own_{key}": value for key, value in count_metrics.items()}
            loss, metrics = loss + self.own_count_weight * count_loss, {**metrics, **own}
        return loss, metrics

    def forward(self, batch: dict, generator: torch.Generator | None = None, mode: str = "loss", **kwargs):
        if mode == "sample":
            return self.model.generate(batch["prompts"], **kwargs)
        m = self.model
        kind = self.kind
        if kind == "clip":
            pixels = m.clip.preprocess(batch["images"]).to(m.device)  # (B, 3, S, S)
            text = m.clip_text_inputs(batch["captions"])
            labels = None
            if m.clip.label_head is not None:
                labels = clip_patch_labels(m.clip.config, batch.get("scenes")).to(m.device)  # (B, N, L)
            neg = m.clip_text_inputs(batch["negative_captions"]) if "negative_captions" in batch else {}
            loss = m.clip.contrastive_loss(
                pixels,
                text["input_ids"],
                text["attention_mask"],
                neg.get("input_ids"),
                neg.get("attention_mask"),
                patch_labels=labels,
            )
            return loss, {}
        if kind == "decoder":
            noise = None
            if m.decoder.config.condition_noise and m.config.target == "clip":
                channels, height, width = m.config.target_shape  # what the DiT generates
                shape = (len(batch["images"]), height * width, channels)
                noise = condition_noise_draws(shape, batch["seeds"], m.decoder.config.condition_noise)
            # (B, N, D), frozen CLIP, as the DiT's target (+ conditioning augmentation)
            features = m.decoder_features(batch["images"], noise)
            images = batch["images"]  # what the decoder learns to draw
            if self.generated_share > 0:
                shape = (len(batch["images"]), *m.config.target_shape)
                renditions = generated_target_draws(
                    shape, batch["seeds"], self.generated_share, self.generated_max_sigma
                )
                if renditions.use.any():
                    features = rendered_features(
                        m, batch["images"], batch["captions"], renditions, features
                    )  # (B, N, D)
                    if self.generated_pairs == "reading":
                        images = reading_images(m, features, batch["images"], batch["seeds"], renditions.use)
            pixels = images_to_tensor(images).to(m.device)  # (B, 3, H, W) in [-1, 1]
            fm = m.decoder.flow_matching
            draws = per_sample_draws(pixels, features, batch["seeds"], fm)
            loss, _ = flow_matching_loss(m.decoder.velocity, pixels, features, cfg=fm, draws=draws)
            return loss, {}
        if kind == "vae":
            pixels = images_to_tensor(batch["images"]).to(m.device)
            return m.vae.loss(pixels, generator), {}
        if kind == "vision":
            tokens = m.backbone.vision_tokens(batch["images"])  # (B, N, H)
            return self.scene_head.loss(tokens, batch["scenes"])
        if kind == "understanding":
            replaced, metrics = contextlib.nullcontext(), {}
            if self.target_tokens:
                use = target_token_draws(batch["seeds"], self.target_tokens)  # (B,)
                scenes = batch.get("scenes")
                if not scenes or any(s is None for s in scenes):
                    raise ValueError(
                        "target_tokens needs one scene per image (shards written with their scenes)"
                    )
                target = self.target_table.targets(scenes, self.target_table.grid)  # (B, N, H)
                replaced = vision_tokens_replaced(m.backbone.vision_tower, target, use)
                metrics = {"target_share": use.float().mean()}
            with replaced:
                loss = m.backbone.understanding_loss(
                    batch["images"], batch["prompts"], batch["answers"], self.understanding_average
                )
            return loss, metrics
        # generation, instruct, joint
        x0 = m.encode_target(batch["images"])  # (B, C, h, w), no grad
        cond = m.condition(batch["captions"])  # (B, L, H): word tokens (if any), then query states
        cross_attention = [] if self.slot_binding_weight > 0 else None  # filled by the DiT, layer by layer
        live = {}  # the conditional velocity with its graph, for the count loss (aux holds it detached)

        def velocity(x, t, c):
            live["v"] = m.dit(x, t, c, cross_attention)  # like x
            return live["v"]

        drop_mask = None  # (B,) rows trained on the null condition (classifier-free guidance dropout)
        if m.config.objective == "flow_matching":
            draws = per_sample_draws(x0, cond, batch["seeds"], m.config.flow)
            drop_mask = draws.drop_mask
            gen_loss, flow_aux = flow_matching_loss(
                velocity, x0, cond.float(), cfg=m.config.flow, draws=draws
            )
        else:
            if cross_attention is not None or self.guided_losses:
                raise ValueError(
                    "slot_binding_weight, count_weight, separation_weight and own_count_weight need the "
                    "flow-matching objective"
                )
            gen_loss, _ = m.objective.loss(m.dit, x0, cond.float())
        if kind == "joint":
            und_loss = m.backbone.understanding_loss(
                batch["images"], batch["prompts"], batch["answers"], self.understanding_average
            )
            loss = gen_loss + self.understanding_weight * und_loss
            return loss, {"gen_loss": gen_loss.detach(), "und_loss": und_loss.detach()}
        if not self.uses_slot_head and cross_attention is None and not self.guided_losses:
            return gen_loss, {}
        # The scaffolding losses of generation and instruct stages (StageConfig forbids them elsewhere).
        loss, metrics = gen_loss, {"gen_loss": gen_loss.detach()}
        scenes = batch.get("scenes") or [None] * len(batch["captions"])
        conditioned = torch.ones(len(batch["captions"]), dtype=torch.bool)  # (B,)
        if drop_mask is not None:
            conditioned = ~drop_mask.bool()  # dropped rows read the null condition: nothing to count or bind
        keep = conditioned & torch.tensor([scene is not None for scene in scenes])  # (B,)
        if self.count_weight > 0:
            readings = guided_readings(
                m, flow_aux["x_t"], flow_aux["sigma"], flow_aux["timestep"], live["v"], cond.float(),
                row_guidance_weights(flow_aux["sigma"], m.config.flow.cfg_scale, m.config.flow),
            )  # (B, N, 19)  # fmt: skip
            counts = scene_counts(scenes, self.count_by).to(m.device)  # (B,) or (B, S) by shape
            count_loss, count_metrics = counted_error(readings, counts, keep.to(m.device))
            loss, metrics = loss + self.count_weight * count_loss, {**metrics, **count_metrics}
        if self.own_trajectory_losses:
            # a few rows whose prompt names several objects, sampled on the model's own trajectory
            rows = [i for i, scene in enumerate(scenes) if keep[i] and len(scene.objects) >= 2]
            rows = rows[: self.separation_rows]
            if rows:
                own_loss, own_metrics = self._own_trajectory_loss(cond[rows].float(), [scenes[i] for i in rows],
                                                                  int(batch["seeds"][rows[0]]))  # fmt: skip
                loss, metrics = loss + own_loss, {**metrics, **own_metrics}
        if cross_attention is not None:
            binding_loss, binding_metrics = slot_binding_loss(
                cross_attention, batch["captions"], scenes, conditioned, self.slot_binding_order
            )
            loss, metrics = loss + self.slot_binding_weight * binding_loss, {**metrics, **binding_metrics}
        if not self.uses_slot_head:
            return loss, metrics
        slots = m.dit.resample_condition(cond.float())  # (B, S, H), the conditional branch's slots
        if self.slot_label_weight > 0:
            slot_loss, label_metrics = self.slot_head.loss(slots, batch["captions"], scenes)
            loss, metrics = loss + self.slot_label_weight * slot_loss, {**metrics, **label_metrics}
        if self.slot_position_weight > 0:
            position_loss, position_metrics = self.slot_head.position_loss(slots, batch["captions"], scenes)
            loss, metrics = loss + self.slot_position_weight * position_loss, {**metrics, **position_metrics}
        if self.slot_relation_weight > 0:
            relation_loss, relation_metrics = self.slot_head.relation_loss(slots, batch["captions"])
            loss, metrics = loss + self.slot_relation_weight * relation_loss, {**metrics, **relation_metrics}
        return loss, metrics


def fit_feature_statistics(model: Blip3o, images: list, batch_size: int = 256) -> None:
    """Fit CLIP's per-channel feature normalisation (the DiT target space) on real images."""
    with torch.no_grad():
        raw = torch.cat(
            [
                model.clip.encode_image_raw(
                    model.clip.preprocess(images[i : i + batch_size]).to(model.device)
                )
                for i in range(0, len(images), batch_size)
            ]
        )  # (M, N, D)
    model.clip.fit_feature_normalization(raw)


def fit_vae_scaling(model: Blip3o, images: list, batch_size: int = 256) -> None:
    with torch.no_grad():
        pixels = torch.cat(
            [images_to_tensor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )
    model.vae.fit_scaling(pixels.to(model.device))


def parameters_of(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
