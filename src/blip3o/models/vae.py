"""A tiny KL autoencoder for the design study's "VAE latents as the DiT target" variant (MetaQuery style).

In that variant the DiT generates these latents instead of CLIP features, and this VAE's decoder makes the
pixels. The default preset maps 64x64 RGB to 16x16x4 latents: 256 tokens at patch size 1, against CLIP's 64,
which is the token-count contrast the paper's study is about.

Latents are returned standardised: (z - shift_factor) * scaling_factor, with both numbers fitted on data by
`fit_scaling` and stored in diffusers' own `AutoencoderKL` config fields (as in SD / SD3), so the DiT's target
has unit scale and the saved model carries the constants.

Training objective: L1 reconstruction plus a small KL term. There is no perceptual or adversarial loss (no
pretrained networks are reachable offline); ShapesWorld's flat colours and hard edges are well served by L1,
which blurs edges less than L2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

CONFIG_NAME = "config.json"
VAE_SUBDIR = "vae"


@dataclass(frozen=True)
class VaeConfig:
    image_size: int = 64
    # Each entry after the first halves the resolution: 3 levels give 16x16 latents for 64x64 images.
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_block_attention: bool = True  # self-attention at the latent resolution
    # Weight of the KL term, per latent element, against the per-pixel-element L1 term. Small: the KL only has
    # to keep the posterior from collapsing to a point; `fit_scaling` takes care of the latents' scale.
    kl_weight: float = 1e-4

    def __post_init__(self) -> None:
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @classmethod
    def from_dict(cls, values: dict) -> VaeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown VaeConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


VAE_PRESETS: dict[str, VaeConfig] = {
    # 64x64x3 -> 16x16x4 (256 tokens of 4 channels).
    "tiny": VaeConfig(),
    # 64x64x3 -> 8x8x16: the same 1024 numbers as "tiny", as 64 tokens (CLIP's count) of 16 channels.
    "tiny_8x8": VaeConfig(block_out_channels=(32, 64, 64, 64), latent_channels=16),
    # "tiny" at half the width: for tests and smoke runs.
    "micro": VaeConfig(block_out_channels=(16, 32, 32), norm_num_groups=8),
}


def vae_config(name: str, **overrides) -> VaeConfig:
    if name not in VAE_PRESETS:
        raise KeyError(f"unknown VAE preset {name!r}; known: {sorted(VAE_PRESETS)}")
    return replace(VAE_PRESETS[name], **overrides)


class Vae(nn.Module):
    def __init__(self, config: VaeConfig, autoencoder: AutoencoderKL | None = None):
        super().__init__()
        self.config = config
        self.autoencoder = autoencoder if autoencoder is not None else self._build(config)

    @staticmethod
    def _build(config: VaeConfig) -> AutoencoderKL:
        levels = len(config.block_out_channels)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=config.image_size,
            mid_block_add_attention=config.mid_block_attention,
            # Placeholders until `fit_scaling`; shift_factor None marks "not fitted".
            scaling_factor=1.0,
            shift_factor=None,
        )

    @property
    def scaling_fitted(self) -> bool:
        return self.autoencoder.config.shift_factor is not None

    def loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 reconstruction + kl_weight * KL, for images (B, 3, H, W) in [-1, 1]; one posterior sample."""
        posterior = self.autoencoder.encode(images).latent_dist
        z = posterior.sample(generator=generator)  # (B, C, h, w)
        reconstruction = self.autoencoder.decode(z).sample  # (B, 3, H, W)
        l1 = (reconstruction - images).abs().mean()
        kl_per_element = posterior.kl().mean() / z[0].numel()  # kl() sums over (C, h, w) per sample
        return l1 + self.config.kl_weight * kl_per_element

    @torch.no_grad()
    def fit_scaling(self, images: torch.Tensor) -> None:
        """Fit shift = mean and scaling = 1 / std of the posterior means of images (M, 3, H, W) in [-1, 1]."""
        z = self.autoencoder.encode(images).latent_dist.mode().double()  # (M, C, h, w)
        self.autoencoder.register_to_config(
            shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std().clamp_min(1e-6))
        )

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> standardised latents (B, C, h, w).

        Posterior mean by default, so a DiT target is a deterministic function of the image (like CLIP's);
        `sample=True` draws from the posterior instead.
        """
        if not self.scaling_fitted:
            raise RuntimeError("latent scaling is not fitted: call fit_scaling first")
        posterior = self.autoencoder.encode(images).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()  # (B, C, h, w)
        cfg = self.autoencoder.config
        return (z - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Standardised latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        if not self.scaling_fitted:
            raise RuntimeError("latent scaling is not fitted: call fit_scaling first")
        cfg = self.autoencoder.config
        z = latents / cfg.scaling_factor + cfg.shift_factor  # (B, C, h, w)
        return self.autoencoder.decode(z).sample.clamp(-1, 1)

    # ---- save / load ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (ours) + vae/ (diffusers' format, which carries the fitted scaling and shift)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        self.autoencoder.save_pretrained(directory / VAE_SUBDIR)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Vae:
        directory = Path(directory)
        config = VaeConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        autoencoder = AutoencoderKL.from_pretrained(directory / VAE_SUBDIR, local_files_only=True)
        return cls(config, autoencoder=autoencoder).eval()
