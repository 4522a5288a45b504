"""The generation target encoder: a CLIP image/text model whose image patch tokens are what the DiT generates.

BLIP3-o generates CLIP features, not VAE latents. The released system takes EVA-CLIP-E-14-plus at 448 px,
keeps the raw output of its last block for the 32x32 patch tokens (CLS dropped, no final norm), average-pools
the grid 4x4 to 8x8 and uses the resulting 64 tokens x 1792 channels as the DiT target, unnormalised.

Here the encoder is a small transformers `CLIPModel` trained from scratch on ShapesWorld with CLIP's
contrastive objective (stage 0). The target it produces differs from the release in one deliberate way:
features are normalised per channel with statistics fitted on data (`fit_feature_normalization`), so the
DiT's flow-matching target has unit scale whatever the encoder's residual-stream scale turned out to be.
The pixel decoder and the diversity metrics consume the same normalised space, so nothing downstream ever
sees raw features.

Feature choice: the residual stream after the last encoder layer, before `post_layernorm`. This matches the
release (raw last-block output, no final norm); in transformers' CLIP `post_layernorm` is only applied to,
and only trained through, the CLS token, so applying it to patch tokens would use a norm they never fed.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

# OpenAI CLIP's pixel statistics, also used by EVA-CLIP in the release. ShapesWorld images are not ImageNet-like
# (bright backgrounds), but keeping the convention means `preprocess` is the familiar CLIP transform and the
# encoder's first layer, trained from scratch, absorbs the offset anyway.
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG_NAME = "config.json"
CLIP_SUBDIR = "clip"
FEATURE_STATS_NAME = "feature_stats.safetensors"
PIXEL_HEAD_NAME = "pixel_head.safetensors"
LABEL_HEAD_NAME = "label_head.safetensors"
# The auxiliary training heads, each saved in its own file when the config builds it.
AUX_HEAD_FILES = {"pixel_head": PIXEL_HEAD_NAME, "label_head": LABEL_HEAD_NAME}


@dataclass(frozen=True)
class ClipConfig:
    """Sizes of the CLIP image/text towers and how the generation target is made from the image tower."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_vocab_size: int = 512  # the project tokenizer's default size; set it from the trained tokenizer
    # Position embeddings: a 4-object long caption is ~100-150 tokens with a 512-token BPE.
    text_max_length: int = 192
    # The tokenizer's special ids, recorded in transformers' config. Our text pooling reads the attention mask,
    # so the loss does not depend on them; they only have to lie inside the vocabulary.
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 512
    projection_dim: int = 128
    # Average-pooling factor on the patch grid for the target: 1 keeps every patch token, 2 halves each side.
    # The release pools 32x32 -> 8x8 (factor 4).
    target_pool: int = 1
    hidden_act: str = "gelu"  # EVA-CLIP uses exact-erf GELU, not OpenAI CLIP's quick_gelu
    # Weight of an auxiliary loss during contrastive training: a linear head predicts each patch's pixels
    # from its last-layer token (0: plain CLIP). CLIP's loss reads only the CLS token, so the patch tokens
    # that become the generation target get no direct gradient and keep little of the shapes' geometry; this
    # term makes them reconstructible, as unified-tokenizer encoders (VILA-U, UniTok) combine the two losses.
    reconstruction_weight: float = 0.0
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
    # What the DiT generates from each normalised token: 0 = all `feature_dim` channels (the release); k > 0 =
    # the top-k principal components, whitened, fitted on data with the normalisation. A small DiT trained on
    # few samples draws coherent shapes sooner on this lower-dimensional, equal-scale target (README, "Where it
    # fails"); the pixel decoder still reads full features, mapped back by `target_to_features`.
    target_components: int = 0
    # Weight of a second auxiliary loss: a linear head reads each last-layer patch token and predicts what the
    # scene holds there (0: off). The target per patch is `patch_label_groups` soft class distributions (the
    # covered share of each class, e.g. each shape and colour plus "none") followed by `patch_label_values`
    # regressed values (e.g. the covered share of each quadrant). Why: the release's CLIP target is semantic
    # (a token says "part of a red star"), which the paper credits for it being easier to generate than VAE
    # latents; the pixel head alone makes our tokens pixel-like. Tried in the recipe: the DiT drew whole objects
    # instead of fragments, but shape stayed weakly readable per token (README, "Where it fails").
    patch_label_weight: float = 0.0
    patch_label_groups: tuple[int, ...] = ()
    patch_label_values: int = 0
    # What the labels say (train/scene_supervision.py): "coverage", what covers each patch; "object", the object
    # whose box centre lies in the patch (shape, colour, centre offset, size, rotation), so one token names a
    # whole object (bench/ideal_target.py: on such tokens a DiT learns ShapesGenEval layouts at CPU scale).
    patch_label_kind: str = "coverage"
    # Average the label loss separately over the patches that hold something (the first group's last class,
    # "none", under one half) and the empty ones, and add the two means. With "object" labels about 3 of 64
    # patches name an object, so a plain mean spends ~95% of the loss on saying "none".
    patch_label_balanced: bool = False
    # How `target_components` directions are chosen: "pca", the top principal components of the tokens; "labels",
    # the directions the label head reads (its weights' row space, orthonormalised; target_components must equal
    # patch_label_dim), so the DiT generates exactly what the head was taught to put in each token.
    target_basis: str = "pca"

    def __post_init__(self) -> None:
        if self.patch_label_weight < 0:
            raise ValueError(f"patch_label_weight must be >= 0, got {self.patch_label_weight}")
        if any(n < 2 for n in self.patch_label_groups) or self.patch_label_values < 0:
            raise ValueError(
                "patch_label_groups must be class counts >= 2 and patch_label_values >= 0, got "
                f"{self.patch_label_groups} / {self.patch_label_values}"
            )
        if self.patch_label_weight and not self.patch_label_dim:
            raise ValueError("patch_label_weight > 0 needs patch_label_groups or patch_label_values")
        if self.patch_label_balanced and not self.patch_label_groups:
            raise ValueError(
                "patch_label_balanced needs patch_label_groups (its first group's last class is 'none')"
            )
        if self.patch_label_kind not in ("coverage", "object"):
            raise ValueError(f"patch_label_kind must be coverage or object, got {self.patch_label_kind!r}")
        if self.target_basis not in ("pca", "labels"):
            raise ValueError(f"target_basis must be pca or labels, got {self.target_basis!r}")
        if self.target_basis == "labels" and not (
            self.patch_label_weight and self.target_components == self.patch_label_dim
        ):
            raise ValueError(
                "target_basis 'labels' needs a label head (patch_label_weight > 0) and target_components equal to "
                f"patch_label_dim ({self.patch_label_dim}), got target_components {self.target_components}"
            )
        if not 0 <= self.target_components <= self.feature_dim:
            raise ValueError(
                f"target_components must be in [0, feature_dim={self.feature_dim}], got {self.target_components}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.patch_grid % self.target_pool:
            raise ValueError(
                f"patch grid {self.patch_grid} is not a multiple of target_pool {self.target_pool}"
            )

    @property
    def patch_grid(self) -> int:
        """Side of the patch-token grid (8 for 64 px / patch 8)."""
        return self.image_size // self.patch_size

    @property
    def target_grid(self) -> int:
        """Side of the pooled target grid."""
        return self.patch_grid // self.target_pool

    @property
    def num_target_tokens(self) -> int:
        return self.target_grid**2

    @property
    def feature_dim(self) -> int:
        """Channels of a feature token: the vision width (patch tokens are taken before any projection)."""
        return self.vision_hidden

    @property
    def patch_label_dim(self) -> int:
        """Width of one patch's label vector (the label head's output)."""
        return sum(self.patch_label_groups) + self.patch_label_values

    @property
    def patch_label_group_slices(self) -> list[slice]:
        """Where each class group lies in a label vector; the regressed values follow the last one."""
        ends = list(itertools.accumulate(self.patch_label_groups))
        return [slice(end - size, end) for size, end in zip(self.patch_label_groups, ends, strict=True)]

    @property
    def target_channels(self) -> int:
        """Channels of what the DiT generates per token: `feature_dim`, or the principal components kept."""
        return self.target_components or self.feature_dim

    def to_hf_config(self) -> CLIPConfig:
        text = CLIPTextConfig(
            vocab_size=self.text_vocab_size,
            hidden_size=self.text_hidden,
            intermediate_size=self.text_mlp,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.text_max_length,
            hidden_act=self.hidden_act,
            projection_dim=self.projection_dim,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        vision = CLIPVisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_mlp,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
            projection_dim=self.projection_dim,
        )
        return CLIPConfig(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=self.projection_dim,
            logit_scale_init_value=self.logit_scale_init,
        )

    @classmethod
    def from_dict(cls, values: dict) -> ClipConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ClipConfig fields: {sorted(unknown)}")
        # JSON has no tuples.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


CLIP_PRESETS: dict[str, ClipConfig] = {
    # 64x64 ShapesWorld, 8x8 = 64 patch tokens (the release's token count) x 128 channels.
    "tiny": ClipConfig(),
    # The same towers with a 4x4 = 16-token target (cheaper DiT, coarser layout).
    "tiny_pool2": ClipConfig(target_pool=2),
    # The released target encoder's shape (EVA02-CLIP-bigE-14-plus at 448 px), for reference and shape tests
    # only: far too big to build here, and its post-norm blocks differ from transformers' pre-norm CLIP.
    "eva_clip_e_14_plus": ClipConfig(
        image_size=448,
        patch_size=14,
        vision_hidden=1792,
        vision_layers=64,
        vision_heads=16,
        vision_mlp=15360,
        text_vocab_size=49408,
        text_max_length=77,
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
        text_hidden=1280,
        text_layers=32,
        text_heads=20,
        text_mlp=5120,
        projection_dim=1024,
        target_pool=4,
    ),
}


def clip_config(name: str, **overrides) -> ClipConfig:
    """A named preset, optionally with fields replaced (e.g. `text_vocab_size` from the tokenizer)."""
    if name not in CLIP_PRESETS:
        raise KeyError(f"unknown CLIP preset {name!r}; known: {sorted(CLIP_PRESETS)}")
    return replace(CLIP_PRESETS[name], **overrides)


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) row-major tokens -> (B, D, h, w) channels-first grid, the layout the release's DiT denoises."""
    batch, num_tokens, dim = tokens.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(batch, dim, side, side)  # (B, D, h, w)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) grid -> (B, h*w, D) tokens in row-major order (inverse of `tokens_to_grid`)."""
    batch, dim, height, width = grid.shape
    return grid.reshape(batch, dim, height * width).transpose(1, 2)  # (B, N, D)


def pool_tokens(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a square grid of row-major tokens by `factor` per side: (B, N, D) -> (B, N / factor^2, D)."""
    if factor == 1:
        return tokens
    grid = tokens_to_grid(tokens)  # (B, D, g, g)
    pooled = F.avg_pool2d(grid, kernel_size=factor, stride=factor)  # (B, D, g/f, g/f)
    return grid_to_tokens(pooled)  # (B, N/f^2, D)


def same_caption_matrix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: True where two rows hold the same caption (same ids on the same attended positions)."""
    ids = input_ids * attention_mask  # (B, L): padding ids zeroed so only the caption is compared
    same_ids = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)  # (B, B)
    same_mask = (attention_mask[:, None, :] == attention_mask[None, :, :]).all(dim=-1)  # (B, B)
    return same_ids & same_mask


class ClipEncoder(nn.Module):
    """A transformers `CLIPModel` plus the recipe that turns its patch tokens into normalised DiT targets."""

    def __init__(self, config: ClipConfig, clip: CLIPModel | None = None):
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else CLIPModel(config.to_hf_config())
        # Per-channel statistics of the pooled raw features; `feature_count` = 0 means not fitted yet.
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        self.register_buffer("feature_count", torch.zeros((), dtype=torch.long))
        # With target_components = k > 0: the top-k principal directions of the normalised tokens (columns,
        # by decreasing variance) and each direction's standard deviation; fitted together with the statistics.
        if config.target_components:
            self.register_buffer("component_basis", torch.zeros(config.feature_dim, config.target_components))
            self.register_buffer("component_std", torch.ones(config.target_components))
        # The auxiliary patch-pixel head (see ClipConfig.reconstruction_weight); not part of the target.
        patch_values = 3 * config.patch_size**2
        self.pixel_head = (
            nn.Linear(config.vision_hidden, patch_values) if config.reconstruction_weight else None
        )
        # The auxiliary patch-label head (see ClipConfig.patch_label_weight); kept as a probe of generated targets.
        self.label_head = (
            nn.Linear(config.vision_hidden, config.patch_label_dim) if config.patch_label_weight else None
        )
        self.register_buffer("pixel_mean", torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    # ---- preprocessing -------------------------------------------------------------------------------------

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> CLIP input (mean/std normalised)."""
        return (images - self.pixel_mean) / self.pixel_std

    def denormalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize_pixels`: CLIP-normalised (B, 3, H, W) -> RGB, [0, 1] for real images."""
        return pixels * self.pixel_std + self.pixel_mean

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) CLIP input, S = image_size.

        The release's transform: RGB, bicubic resize of the shorter side to S, centre crop, [0, 1], CLIP mean/std.
        ShapesWorld renders are already S x S, so for them this is only the last two steps.
        """
        size = self.config.image_size
        arrays = []
        for image in images:
            image = image.convert("RGB")
            if image.size != (size, size):
                scale = size / min(image.size)
                resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
                image = image.resize(resized, Image.Resampling.BICUBIC)
                left, top = (image.width - size) // 2, (image.height - size) // 2
                image = image.crop((left, top, left + size, top + size))
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S) in [0, 1]
        return self.normalize_pixels(batch.to(self.pixel_mean.device))

    # ---- contrastive training ------------------------------------------------------------------------------

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, projection_dim) projected caption embeddings, unnormalised."""
        # transformers pools text at the first `eos_token_id` (or the highest id), which ties the model to a
        # tokenizer's special ids. Under the causal mask the caption's last token has seen the whole caption,
        # so pooling there is CLIP's EOT pooling without a magic id. Positions count attended tokens only, so a
        # caption gets the same embedding with left padding (the project tokenizer's default) or right padding.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, L)
        hidden = self.clip.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, L, text_hidden)
        length = attention_mask.shape[1]
        last = (
            length - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)
        )  # (B,) index of the last attended token
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, text_hidden)
        return self.clip.text_projection(pooled)  # (B, projection_dim)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP input -> (B, projection_dim) projected image embeddings, unnormalised."""
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output  # (B, projection_dim)

    def similarity(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, B) scaled cosine similarities, image rows x text columns (CLIP's logits_per_image)."""
        image = F.normalize(self.image_embeddings(pixel_values), dim=-1)  # (B, P)
        text = F.normalize(self.text_embeddings(input_ids, attention_mask), dim=-1)  # (B, P)
        return self.clip.logit_scale.exp() * image @ text.T  # (B, B)

    def contrastive_loss(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        negative_ids: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        patch_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CLIP's symmetric InfoNCE, with every pair of identical captions counted as a positive.

        ShapesWorld captions repeat within a batch ("an orange circle" can describe many images). Each row's
        target distribution is uniform over all columns with the same caption (multi-positive InfoNCE), which
        states what a duplicate is instead of leaving it implicit. In value it is plain InfoNCE: identical
        captions embed identically, so their logits are equal and averaging the log-probability over them
        changes nothing. Either way the loss floor is the mean log(number of duplicates), not 0. Long captions
        (which spell out layout) are nearly unique and also make the image features carry position, so they are
        the better choice.

        `negative_ids` / `negative_mask` (B, L'): optional hard-negative captions (NegCLIP-style), e.g. each
        caption with one shape word swapped. They join the image-to-text columns only; a negative whose text
        equals a row's own caption counts as a positive for that row, so no true description is pushed away.
        Random batches of ShapesWorld can be told apart by colour alone; swapped-shape negatives make the
        image embedding separate shapes. (Measured: they do not make the patch tokens, the generation target,
        more shape-decodable; the pixel head below does. bench/clip_probe.py.)

        `patch_labels` (B, g*g, patch_label_dim): each patch's label vector, needed when the config has a label
        head (ClipConfig.patch_label_weight); see `_patch_label_loss`.
        """
        vision = self.clip.vision_model(pixel_values=pixel_values)
        image = F.normalize(self.clip.visual_projection(vision.pooler_output), dim=-1)  # (B, P)
        text = F.normalize(self.text_embeddings(input_ids, attention_mask), dim=-1)  # (B, P)
        patches = vision.last_hidden_state[:, 1:]  # (B, g*g, D)
        aux = self._reconstruction_loss(patches, pixel_values) + self._patch_label_loss(patches, patch_labels)
        return self._contrastive(image, text, input_ids, attention_mask, negative_ids, negative_mask) + aux

    def _patch_label_loss(self, patches: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Weighted loss of the label head on (B, g*g, D) tokens: soft cross-entropy per class group, MSE on the
        regressed values; 0 without a head."""
        if self.label_head is None:
            return patches.new_zeros(())
        expected = (*patches.shape[:2], self.config.patch_label_dim)
        if labels is None or tuple(labels.shape) != expected:
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(
                f"this CLIP has a patch-label head: pass patch_labels of shape {expected}, got {got}"
            )
        out = self.label_head(patches)  # (B, g*g, L)
        per_patch = patches.new_zeros(patches.shape[:2])  # (B, g*g)
        for group in self.config.patch_label_group_slices:
            logp = F.log_softmax(out[..., group], dim=-1)  # (B, g*g, group size)
            per_patch = per_patch - (labels[..., group] * logp).sum(-1)
        if self.config.patch_label_values:
            values = slice(sum(self.config.patch_label_groups), None)
            per_patch = per_patch + (out[..., values] - labels[..., values]).pow(2).mean(-1)
        if not self.config.patch_label_balanced:
            return self.config.patch_label_weight * per_patch.mean()
        none = self.config.patch_label_group_slices[0].stop - 1
        holds = labels[..., none] < 0.5  # (B, g*g)
        # An empty side (a batch of blank images) contributes 0, not NaN.
        loss = sum(per_patch[side].sum() / side.sum().clamp(min=1) for side in (holds, ~holds))
        return self.config.patch_label_weight * loss

    def patch_labels_from_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) patch tokens (B, g*g, D) -> the label head's (B, g*g, L) reading: each class group
        as probabilities, then the regressed values. Reads generated targets too (`target_to_features` and
        `denormalize_features` first)."""
        if self.label_head is None:
            raise ValueError("this encoder has no patch-label head (ClipConfig.patch_label_weight is 0)")
        # Differentiable (the count loss, train/count_supervision.py, trains the DiT through it); readers that
        # only look call it under torch.no_grad.
        logits = self.label_head(patches)  # (B, g*g, L)
        read = logits.clone()
        for group in self.config.patch_label_group_slices:
            read[..., group] = logits[..., group].softmax(-1)
        return read  # (B, g*g, L)

    def patch_labels_from_target(self, target_tokens: torch.Tensor) -> torch.Tensor:
        """What the DiT generates, as tokens (B, g*g, k) -> the label head's (B, g*g, L) reading of the CLIP
        features they map back to. Differentiable, like `patch_labels_from_tokens`."""
        raw = self.denormalize_features(self.target_to_features(target_tokens))  # (B, g*g, D)
        return self.patch_labels_from_tokens(raw)

    def _reconstruction_loss(self, patches: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Weighted MSE of the linear head's patch pixels (B, g*g, D) -> (B, g*g, 3*p*p); 0 without a head."""
        if self.pixel_head is None:
            return patches.new_zeros(())
        p = self.config.patch_size
        target = F.unfold(pixel_values, kernel_size=p, stride=p).transpose(1, 2)  # (B, g*g, 3*p*p), row-major
        return self.config.reconstruction_weight * F.mse_loss(self.pixel_head(patches), target)

    @torch.no_grad()
    def reconstruct_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP input -> the pixel head's (B, 3, S, S) reconstruction, in the same normalised space."""
        patches = self.clip.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (B, g*g, D)
        return self.pixels_from_patch_tokens(patches)

    @torch.no_grad()
    def pixels_from_patch_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised, unpooled) patch tokens (B, g*g, D) -> the pixel head's (B, 3, S, S) image, in CLIP's
        normalised pixel space. Also reads generated targets back (denormalize_features first)."""
        if self.pixel_head is None:
            raise ValueError("this encoder has no pixel head (reconstruction_weight is 0)")
        s, p = self.config.image_size, self.config.patch_size
        return F.fold(self.pixel_head(patches).transpose(1, 2), (s, s), kernel_size=p, stride=p)

    def _contrastive(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        negative_ids: torch.Tensor | None,
        negative_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        scale = self.clip.logit_scale.exp()
        logits = scale * image @ text.T  # (B, B)
        positives = same_caption_matrix(input_ids, attention_mask).float()  # (B, B), symmetric
        targets = positives / positives.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
        text_to_image = F.cross_entropy(logits.T, targets)
        if negative_ids is None:
            return (F.cross_entropy(logits, targets) + text_to_image) / 2
        if negative_mask is None:
            raise ValueError("negative_ids needs negative_mask")
        negative = F.normalize(self.text_embeddings(negative_ids, negative_mask), dim=-1)  # (B', P)
        all_logits = torch.cat([logits, scale * image @ negative.T], dim=1)  # (B, B + B')
        width = max(input_ids.shape[1], negative_ids.shape[1])

        def stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # right-pad both to width, then concat
            return torch.cat([F.pad(a, (0, width - a.shape[1])), F.pad(b, (0, width - b.shape[1]))])

        all_ids = stack(input_ids, negative_ids)  # (B + B', W)
        all_mask = stack(attention_mask, negative_mask)  # (B + B', W)
        all_positives = same_caption_matrix(all_ids, all_mask)[: input_ids.shape[0]].float()  # (B, B + B')
        image_to_text = F.cross_entropy(all_logits, all_positives / all_positives.sum(dim=1, keepdim=True))
        return (image_to_text + text_to_image) / 2

    # ---- generation targets --------------------------------------------------------------------------------

    def encode_image_raw(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D) pooled patch tokens of the last layer, unnormalised."""
        hidden = self.clip.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + g*g, D)
        patches = hidden[:, 1:]  # (B, g*g, D): CLS dropped
        return pool_tokens(patches, self.config.target_pool)  # (B, N, D)

    @property
    def feature_normalization_fitted(self) -> bool:
        return bool(self.feature_count > 0)

    @torch.no_grad()
    def fit_feature_normalization(self, features: torch.Tensor) -> None:
        """Store per-channel mean/std of raw pooled features (M, N, D), e.g. `encode_image_raw` on a data set,
        and with `target_components` the principal directions of the normalised tokens."""
        flat = features.reshape(-1, features.shape[-1]).double()  # (M*N, D)
        if flat.shape[0] < 2:
            raise ValueError("need at least two feature tokens to fit a standard deviation")
        mean, std = flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6)  # (D,), (D,)
        if self.config.target_components:
            self._fit_components((flat - mean) / std, std)
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float())
        self.feature_count.fill_(flat.shape[0])

    def with_target_components(self, k: int, raw: torch.Tensor) -> ClipEncoder:
        """An encoder sharing these towers whose DiT target is the top-k components (0: all channels), its
        statistics fitted on raw pooled features (M, N, D): to try a target without retraining anything."""
        other = ClipEncoder(replace(self.config, target_components=k), clip=self.clip)
        other.to(self.feature_mean.device).fit_feature_normalization(raw)
        return other

    def _fit_components(self, normalised: torch.Tensor, std: torch.Tensor) -> None:
        """The target directions for (M, D) zero-mean normalised tokens (`std`: the raw channels' std, (D,)) and
        the standard deviation along each. "pca": principal directions by decreasing variance. "labels": an
        orthonormal basis of the space the label head reads; in normalised coordinates its weights are W * std.
        Each column's sign is fixed (largest entry positive) so that a refit on the same data gives the same basis."""
        k = self.config.target_components
        if self.config.target_basis == "labels":
            weights = self.label_head.weight.double() * std  # (L, D): what the head reads, normalised space
            basis, _ = torch.linalg.qr(weights.T)  # (D, L) orthonormal, same span
            variances = (normalised @ basis).var(dim=0)  # (L,)
        else:
            covariance = normalised.T @ normalised / (normalised.shape[0] - 1)  # (D, D)
            variances, vectors = torch.linalg.eigh(covariance)  # ascending
            basis, variances = vectors.flip(1)[:, :k], variances.flip(0)[:k]  # (D, k), (k,)
        peak = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))  # (1, k)
        self.component_basis.copy_((basis * peak.sign()).float())
        self.component_std.copy_(variances.clamp_min(1e-12).sqrt().float())

    def normalize_features(self, raw: torch.Tensor) -> torch.Tensor:
        if not self.feature_normalization_fitted:
            raise RuntimeError("feature normalisation is not fitted: call fit_feature_normalization first")
        return (raw - self.feature_mean) / self.feature_std

    def denormalize_features(self, features: torch.Tensor) -> torch.Tensor:
        if not self.feature_normalization_fitted:
            raise RuntimeError("feature normalisation is not fitted: call fit_feature_normalization first")
        return features * self.feature_std + self.feature_mean

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP input -> (B, N, D) normalised feature tokens, row-major over the pooled grid."""
        return self.normalize_features(self.encode_image_raw(pixel_values))

    def features_to_target(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised feature tokens (B, N, D) -> what the DiT generates, (B, N, target_channels)."""
        if not self.config.target_components:
            return features
        if not self.feature_normalization_fitted:
            raise RuntimeError("target components are not fitted: call fit_feature_normalization first")
        return features @ self.component_basis / self.component_std  # (B, N, k), unit variance each

    def target_to_features(self, target: torch.Tensor) -> torch.Tensor:
        """The inverse of `features_to_target` (exact on the kept components): (B, N, k) -> (B, N, D)."""
        if not self.config.target_components:
            return target
        if not self.feature_normalization_fitted:
            raise RuntimeError("target components are not fitted: call fit_feature_normalization first")
        return (target * self.component_std) @ self.component_basis.T  # (B, N, D)

    # ---- save / load ---------------------------------------------------------------------------------------

    def _stat_names(self) -> tuple[str, ...]:
        """The fitted buffers saved in feature_stats.safetensors."""
        names = ("feature_mean", "feature_std", "feature_count")
        return names + (("component_basis", "component_std") if self.config.target_components else ())

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (our fields) + clip/ (transformers' own format) + feature_stats.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        self.clip.save_pretrained(directory / CLIP_SUBDIR)
        for name, filename in AUX_HEAD_FILES.items():
            head = getattr(self, name)
            if head is not None:
                weights = {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
                save_file(weights, directory / filename)
        stats = {name: getattr(self, name) for name in self._stat_names()}
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in stats.items()}, directory / FEATURE_STATS_NAME
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipEncoder:
        directory = Path(directory)
        config = ClipConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        clip = CLIPModel.from_pretrained(directory / CLIP_SUBDIR, local_files_only=True)
        encoder = cls(config, clip=clip)
        stats = load_file(directory / FEATURE_STATS_NAME)
        if set(stats) != set(encoder._stat_names()):
            raise ValueError(
                f"{directory / FEATURE_STATS_NAME} holds {sorted(stats)}, but this config needs "
                f"{sorted(encoder._stat_names())}"
            )
        for name, value in stats.items():
            getattr(encoder, name).copy_(value)
        for name, filename in AUX_HEAD_FILES.items():
            head = getattr(encoder, name)
            if head is not None:
                weights = load_file(directory / filename)
                head.load_state_dict({k.removeprefix(f"{name}."): v for k, v in weights.items()})
        return encoder.eval()
