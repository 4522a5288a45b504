"""The pixel decoder: a diffusion model that turns CLIP target tokens back into 64x64 RGB images.

The released system decodes its 64 EVA-CLIP tokens with an SDXL-architecture UNet (from Emu2-Gen) that
cross-attends to the tokens, 50 steps, guidance 3 against an empty condition. Here it is a small diffusers
`UNet2DConditionModel`, trained in stage 0 to reconstruct images from their own (normalised) CLIP features.

Choices:
- Pixel space, not VAE latents: a 64x64 image is already small enough for a tiny UNet on CPU, and decoding
  pixels directly keeps stage 0 to two models (CLIP + decoder) with no VAE to train first. The
  VAE (`vae.py`) exists only for the design study's "VAE latents as the DiT target" variant.
- Rectified flow (x_t = (1 - s) x0 + s e, velocity target e - x0), trained with the project's transport
  objective (`blip3o.transport.flow_matching`, the DiT's: one set of maths, one reproducibility contract)
  and sampled with diffusers' `FlowMatchEulerDiscreteScheduler`: deterministic, no `scale_model_input`,
  straight paths that give usable samples at ~20 Euler steps (a DDPM/DDIM decoder would be a second noise
  convention in the project for no gain). The UNet sees timestep 1000 * s, the scheduler's convention.
- Attention (self + cross) only at 16x16, in the last down block, the mid block and the first up block:
  measured on CPU, attention at 32x32 (1024 positions) made a training step ~4x slower, and the 8x8 feature
  grid carries no detail finer than 16x16 anyway; the 64x64 and 32x32 levels are convolutional.
- A learned position embedding is added to the feature tokens: cross-attention is blind to key order, and the
  layout of a ShapesWorld scene ("left of", "above") must not depend on the encoder having kept its input
  position embedding in the residual stream.
- Classifier-free guidance: features are replaced by zeros with probability `feature_dropout` in training; in
  normalised feature space zero is the mean feature, and it matches the release's zeroed condition.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from blip3o.models.clip import ClipEncoder, tokens_to_grid
from blip3o.transport.flow_matching import (
    FlowMatchingConfig,
    flow_matching_loss,
    guided_velocity,
    initial_noise,
)

CONFIG_NAME = "config.json"
UNET_SUBDIR = "unet"
SCHEDULER_SUBDIR = "scheduler"
EXTRA_WEIGHTS_NAME = "feature_pos_embed.safetensors"


@dataclass(frozen=True)
class PixelDecoderConfig:
    image_size: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    # One entry per resolution level, highest resolution first; attention where it is affordable.
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    # Passed as diffusers' `attention_head_dim`, which (a legacy misnomer) is the number of heads.
    attention_heads: int = 4
    norm_num_groups: int = 16
    feature_dim: int = 128  # channels of a CLIP target token (ClipConfig.feature_dim)
    num_feature_tokens: int = 64  # tokens per image (ClipConfig.num_target_tokens)
    feature_dropout: float = 0.1  # probability of zeroing a sample's features in training (for CFG)
    num_train_timesteps: int = 1000
    shift: float = 1.0  # flow-matching time shift; 1 = none
    sample_steps: int = 20
    cfg_scale: float = 3.0  # the release decoder's guidance
    # > 0: also feed the features spatially: the 8x8 token grid, projected to this many channels by a 1x1
    # conv and upsampled (nearest) to the image, is concatenated to the noisy image as extra UNet input
    # channels. Cross-attention alone must learn where each token belongs; the grid is aligned with the image.
    spatial_channels: int = 0
    # How the projected grid reaches image size: "nearest" upsampling (every pixel of a patch sees the same
    # values), or "pixel_shuffle": the 1x1 conv makes spatial_channels x f x f values per token, laid out as the
    # token's f x f pixels (sub-pixel convolution), so the branch can draw inside a patch. With 3 channels it
    # is a linear per-patch rendering of the features, which `init_spatial_from_clip` can start from the CLIP
    # encoder's auxiliary pixel head.
    spatial_upsample: str = "nearest"
    # Side of the projection's kernel on the token grid (odd). 1: each token feeds only its own patch. 3: a
    # token also paints into its 8 neighbours, so a token that names a whole object (one token per object,
    # objects wider than a patch) can draw all of it.
    spatial_kernel: int = 1
    # Conditioning augmentation (Ho et al., cascaded diffusion): in training, the condition gets Gaussian noise
    # of a std drawn per sample, uniform in [0, condition_noise], in the units of the DiT's target (unit
    # variance per channel). The decoder learns from exact CLIP tokens but decodes the DiT's inexact ones;
    # trained on perturbed tokens it must draw a clean image from a nearby token. 0: off. Sampling is unchanged.
    condition_noise: float = 0.0
    # Decodes drawn per DiT output at sampling; > 1 keeps the one whose CLIP reading agrees best with the output
    # (`Blip3o.decode_target`, models/decode_choice.py). The decoder's own noise decides whether two near
    # objects come out as one: the same counting tokens pass the judge in 0-4 of 4 decodes (session 58).
    sample_candidates: int = 1

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError("need one down and one up block type per entry of block_out_channels")
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} does not survive {levels - 1} halvings")
        if self.spatial_upsample not in ("nearest", "pixel_shuffle"):
            raise ValueError(
                f"spatial_upsample must be nearest or pixel_shuffle, got {self.spatial_upsample!r}"
            )
        if self.spatial_kernel < 1 or self.spatial_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel must be a positive odd number, got {self.spatial_kernel}")
        if self.condition_noise < 0:
            raise ValueError(f"condition_noise must be >= 0, got {self.condition_noise}")
        if self.sample_candidates < 1:
            raise ValueError(f"sample_candidates must be >= 1, got {self.sample_candidates}")

    @property
    def grid(self) -> int:
        """Side of the feature-token grid."""
        return math.isqrt(self.num_feature_tokens)

    @property
    def spatial_factor(self) -> int:
        """Pixels per token side (8 for 64 px and an 8x8 grid)."""
        return self.image_size // self.grid

    @classmethod
    def from_dict(cls, values: dict) -> PixelDecoderConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown PixelDecoderConfig fields: {sorted(unknown)}")
        # JSON has no tuples.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


DECODER_PRESETS: dict[str, PixelDecoderConfig] = {
    # The tiny decoder with the feature grid also fed spatially (see spatial_channels).
    "tiny_spatial": PixelDecoderConfig(spatial_channels=16),
    # ... as a per-patch linear rendering (3 channels, sub-pixel layout), started from CLIP's pixel head.
    "tiny_render": PixelDecoderConfig(spatial_channels=3, spatial_upsample="pixel_shuffle"),
    # ... with a 3x3 projection writing 8 channels into each token's pixels and its neighbours': for targets
    # with one token per object (bench/ideal_target.py).
    "tiny_footprint": PixelDecoderConfig(
        spatial_channels=8, spatial_upsample="pixel_shuffle", spatial_kernel=3
    ),
    # For the tiny CLIP (64 tokens x 128).
    "tiny": PixelDecoderConfig(),
    # For the tiny CLIP with target_pool=2 (16 tokens x 128).
    "tiny_pool2": PixelDecoderConfig(num_feature_tokens=16),
    # Same layout at a quarter of the width: for tests and smoke runs, not for images worth looking at.
    "micro": PixelDecoderConfig(block_out_channels=(16, 32, 32), attention_heads=2, norm_num_groups=8),
}


def decoder_config(name: str, **overrides) -> PixelDecoderConfig:
    if name not in DECODER_PRESETS:
        raise KeyError(f"unknown decoder preset {name!r}; known: {sorted(DECODER_PRESETS)}")
    return replace(DECODER_PRESETS[name], **overrides)


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1], the decoder's (and the VAE's) pixel range."""
    batch = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (B, H, W, 3)
    return torch.from_numpy(batch).permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W)


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), mode="RGB") for p in pixels]


class PixelDecoder(nn.Module):
    def __init__(self, config: PixelDecoderConfig, unet: UNet2DConditionModel | None = None):
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else self._build_unet(config)
        # Small init: at the start the condition is (almost) the features themselves.
        self.feature_pos_embed = nn.Parameter(
            0.02 * torch.randn(config.num_feature_tokens, config.feature_dim)
        )
        per_token = config.spatial_factor**2 if config.spatial_upsample == "pixel_shuffle" else 1
        self.feature_to_pixels = (
            nn.Conv2d(
                config.feature_dim,
                config.spatial_channels * per_token,
                kernel_size=config.spatial_kernel,
                padding=config.spatial_kernel // 2,
            )
            if config.spatial_channels
            else None
        )

    @staticmethod
    def _build_unet(config: PixelDecoderConfig) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=config.image_size,
            in_channels=3 + config.spatial_channels,
            out_channels=3,
            block_out_channels=config.block_out_channels,
            down_block_types=config.down_block_types,
            up_block_types=config.up_block_types,
            layers_per_block=config.layers_per_block,
            attention_head_dim=config.attention_heads,
            norm_num_groups=config.norm_num_groups,
            cross_attention_dim=config.feature_dim,
        )

    @property
    def flow_matching(self) -> FlowMatchingConfig:
        """The decoder's flow-matching settings in the project's transport terms."""
        n = self.config.num_train_timesteps
        return FlowMatchingConfig(
            num_train_timesteps=n,
            shift=self.config.shift,
            cfg_dropout=self.config.feature_dropout,
            timestep_scale=float(n),  # the UNet sees diffusers' timestep, n * sigma
            sample_steps=self.config.sample_steps,
            cfg_scale=self.config.cfg_scale,
        )

    def make_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        # A fresh scheduler per sampling call: diffusers schedulers keep a step index, so sharing one would
        # make concurrent or interrupted sampling calls interfere.
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.config.num_train_timesteps, shift=self.config.shift
        )

    def _condition(self, features: torch.Tensor) -> torch.Tensor:
        expected = (self.config.num_feature_tokens, self.config.feature_dim)
        if tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"features must be (B, {expected[0]}, {expected[1]}), got {tuple(features.shape)}"
            )
        return features + self.feature_pos_embed  # (B, N, D)

    def velocity(self, noisy: torch.Tensor, timestep: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """UNet velocity for noisy images (B, 3, H, W) at timesteps (B,) = n * sigma, given features (B, N, D)."""
        condition = self._condition(features)  # (B, N, D)
        if self.feature_to_pixels is not None:
            spatial = self.spatial_input(features)  # (B, S, H, W)
            noisy = torch.cat([noisy, spatial.to(noisy.dtype)], dim=1)  # (B, 3 + S, H, W)
        return self.unet(noisy, timestep, encoder_hidden_states=condition).sample

    def spatial_input(self, features: torch.Tensor) -> torch.Tensor:
        """The extra UNet input channels (B, S, H, W) drawn from features (B, N, D) (see spatial_channels)."""
        if self.feature_to_pixels is None:
            raise ValueError("this decoder has no spatial branch (spatial_channels is 0)")
        grid = self.feature_to_pixels(tokens_to_grid(features))  # (B, S or S*f*f, g, g); zero -> bias only
        if self.config.spatial_upsample == "pixel_shuffle":
            return F.pixel_shuffle(grid, self.config.spatial_factor)  # (B, S, H, W)
        size = self.config.image_size
        return F.interpolate(grid, size=(size, size), mode="nearest")  # (B, S, H, W)

    def loss(
        self, images: torch.Tensor, features: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Flow-matching loss for images (B, 3, H, W) in [-1, 1] given their normalised CLIP features (B, N, D).

        The project's transport objective (the DiT's): a level uniform over the scheduler's training table,
        x_t = (1 - sigma) x0 + sigma e, target e - x0, features zeroed with probability `feature_dropout`.
        """
        loss, _ = flow_matching_loss(self.velocity, images, features, generator, self.flow_matching)
        return loss

    @torch.no_grad()
    def decode(
        self,
        features: torch.Tensor,
        steps: int | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised CLIP features (B, N, D) -> images (B, 3, H, W) in [-1, 1].

        Euler steps of diffusers' FlowMatchEulerDiscreteScheduler over its default schedule: `steps` sigmas
        evenly spaced from 1 to 1 / num_train_timesteps, then 0. With cfg_scale != 1 the conditional and
        zero-feature branches share one UNet call of batch 2B per step: v = v_u + cfg_scale * (v_c - v_u).
        """
        fm = self.flow_matching
        steps = fm.sample_steps if steps is None else steps
        cfg_scale = fm.cfg_scale if cfg_scale is None else cfg_scale
        size = self.config.image_size
        shape = (features.shape[0], 3, size, size)
        # Drawn on the generator's device (CPU by default), so a seed gives the same images on any device.
        sample = initial_noise(shape, generator, device=features.device, dtype=features.dtype)  # (B, 3, H, W)
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(steps, device=features.device)
        for timestep in scheduler.timesteps:
            batch_timestep = timestep.expand(shape[0])  # (B,)
            velocity = guided_velocity(self.velocity, sample, batch_timestep, features, cfg_scale)
            sample = scheduler.step(velocity, timestep, sample).prev_sample.to(features.dtype)
        return sample.clamp(-1, 1)

    @torch.no_grad()
    def init_spatial_from_clip(self, clip: ClipEncoder) -> None:
        """Start the pixel-shuffle branch as CLIP's auxiliary pixel head, re-expressed for this decoder.

        The head maps raw last-layer tokens to CLIP-normalised pixels; the branch reads normalised tokens
        (raw = norm * std + mean) and should produce decoder pixels in [-1, 1] (y = 2 (std_px h + mean_px) - 1).
        Both maps are affine, so the composition is exact: at step 0 the branch already draws what the head
        draws, and the UNet starts from a coarse rendering instead of learning geometry from scratch.
        """
        cfg = self.config
        if clip.pixel_head is None:
            raise ValueError("the CLIP encoder has no pixel head (ClipConfig.reconstruction_weight is 0)")
        if (cfg.spatial_upsample, cfg.spatial_channels, cfg.spatial_kernel) != ("pixel_shuffle", 3, 1):
            raise ValueError(
                "init_spatial_from_clip needs spatial_upsample='pixel_shuffle', spatial_channels=3, "
                "spatial_kernel=1"
            )
        if clip.config.patch_size != cfg.spatial_factor or clip.config.target_pool != 1:
            raise ValueError(
                "the CLIP patch grid must be the decoder's token grid (patch size = spatial factor)"
            )
        if not clip.feature_normalization_fitted:
            raise ValueError("fit CLIP's feature normalisation before initialising from its pixel head")
        f2 = cfg.spatial_factor**2
        channel = torch.arange(3).repeat_interleave(f2)  # (3 f^2,) colour channel of each output
        px_std = clip.pixel_std.flatten()[channel]  # (3 f^2,)
        px_mean = clip.pixel_mean.flatten()[channel]  # (3 f^2,)
        weight = clip.pixel_head.weight * clip.feature_std  # (3 f^2, D): acts on normalised tokens
        bias = clip.pixel_head.weight @ clip.feature_mean + clip.pixel_head.bias  # (3 f^2,)
        self.feature_to_pixels.weight.copy_((2 * px_std[:, None] * weight)[:, :, None, None])
        self.feature_to_pixels.bias.copy_(2 * (px_std * bias + px_mean) - 1)

    # ---- save / load ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (ours) + unet/ and scheduler/ (diffusers' formats) + our own small weights (the feature
        position embedding and, with spatial conditioning, its 1x1 projection)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        self.unet.save_pretrained(directory / UNET_SUBDIR)
        self.make_scheduler().save_pretrained(directory / SCHEDULER_SUBDIR)
        extra = {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in extra.items()}, directory / EXTRA_WEIGHTS_NAME
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PixelDecoder:
        directory = Path(directory)
        config = PixelDecoderConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        unet = UNet2DConditionModel.from_pretrained(directory / UNET_SUBDIR, local_files_only=True)
        decoder = cls(config, unet=unet)
        missing, unexpected = decoder.load_state_dict(load_file(directory / EXTRA_WEIGHTS_NAME), strict=False)
        if unexpected or any(not k.startswith("unet.") for k in missing):
            raise ValueError(
                f"{directory / EXTRA_WEIGHTS_NAME} does not match the config: {missing} {unexpected}"
            )
        return decoder.eval()
