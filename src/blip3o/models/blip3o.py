"""BLIP3-o, the whole: backbone + queries -> condition -> DiT (flow matching) -> CLIP features -> pixel decoder.

`Blip3o` is single-device model code: it owns the components and the inference paths (`understand`,
`generate`, `encode_image`) and the release layout (`save_pretrained` / `from_pretrained`, one folder per
component, each config.json + safetensors). Training losses live in blip3o.train.stages.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from blip3o.data.tokenizer import shapes_corpus, train_tokenizer
from blip3o.models.backbone import QUERIES_FILE, Backbone, BackboneConfig
from blip3o.models.clip import (
    FEATURE_STATS_NAME,
    ClipConfig,
    ClipEncoder,
    grid_to_tokens,
    tokens_to_grid,
)
from blip3o.models.count_guidance import clip_count_steer
from blip3o.models.decode_choice import best_candidate, decode_disagreements
from blip3o.models.decoder import PixelDecoder, PixelDecoderConfig, images_to_tensor, tensor_to_images
from blip3o.models.dit import DiT, DiTConfig
from blip3o.models.int8_storage import dequantize_state, quantize_state
from blip3o.models.vae import Vae, VaeConfig
from blip3o.transport import FlowMatchingConfig, build_objective, initial_noise, interpolate, sample_euler

CONFIG_FILE = "config.json"
DIT_WEIGHTS = "model.safetensors"
MODEL_TYPE = "blip3o"
STORAGE_DTYPE_KEY = "storage_dtype"  # in the top config.json: how the weight files store floats
DIT_STORAGE_KEY = "dit_storage"  # in the top config.json: "int8" for int8 DiT matrices (int8_storage)
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

Target = Literal["clip", "vae"]
Objective = Literal["flow_matching", "mse"]


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or corrupt."""


@dataclass(frozen=True)
class Blip3oConfig:
    """Every component's shape plus how they connect. Validated on construction: mismatches fail loudly."""

    backbone: BackboneConfig
    clip: ClipConfig
    dit: DiTConfig
    decoder: PixelDecoderConfig
    vae: VaeConfig | None = None
    target: Target = "clip"  # what the DiT generates: CLIP features (BLIP3-o) or VAE latents (the study)
    objective: Objective = "flow_matching"  # or "mse": the paper's CLIP + MSE regression baseline
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    tokenizer_corpus_scenes: int = 3000  # ShapesWorld scenes the miniature's tokenizer is trained on

    def __post_init__(self) -> None:
        if self.target not in ("clip", "vae"):
            raise ValueError(f"target must be 'clip' or 'vae', got {self.target!r}")
        if self.objective not in ("flow_matching", "mse"):
            raise ValueError(f"objective must be 'flow_matching' or 'mse', got {self.objective!r}")
        if self.backbone.n_queries < 1:
            raise ValueError(f"backbone.n_queries must be >= 1, got {self.backbone.n_queries}")
        if self.dit.latent_embedding_size != self.backbone.hidden_size:
            raise ValueError(
                f"dit.latent_embedding_size {self.dit.latent_embedding_size} must equal the backbone's "
                f"hidden_size {self.backbone.hidden_size} (the condition is the backbone's hidden states)"
            )
        channels, grid = self.target_shape[0], self.target_shape[1]
        if self.dit.in_channels != channels or self.dit.input_size != grid:
            raise ValueError(
                f"the DiT generates {self.dit.in_channels} x {self.dit.input_size}^2 but the {self.target} target "
                f"is {channels} x {grid}^2: set dit.in_channels={channels}, dit.input_size={grid}"
            )
        if (self.decoder.feature_dim, self.decoder.num_feature_tokens) != (
            self.clip.feature_dim,
            self.clip.num_target_tokens,
        ):
            raise ValueError(
                f"the pixel decoder reads {self.decoder.num_feature_tokens} x {self.decoder.feature_dim} features "
                f"but CLIP makes {self.clip.num_target_tokens} x {self.clip.feature_dim}"
            )

    @property
    def target_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the DiT generates."""
        if self.target == "clip":
            return (self.clip.target_channels, self.clip.target_grid, self.clip.target_grid)
        if self.vae is None:
            raise ValueError("target 'vae' needs a vae config")
        return (self.vae.latent_channels, self.vae.latent_size, self.vae.latent_size)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip3oConfig:
        # model_type and the storage keys describe the files, not the model.
        d = {k: v for k, v in d.items() if k not in ("model_type", STORAGE_DTYPE_KEY, DIT_STORAGE_KEY)}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Blip3oConfig fields: {sorted(unknown)}")
        backbone = dict(d["backbone"])
        for key in ("mrope_section", "fullatt_block_indexes"):
            backbone[key] = tuple(backbone[key])
        return cls(
            backbone=BackboneConfig(**backbone),
            clip=ClipConfig.from_dict(d["clip"]),
            dit=DiTConfig.from_dict(d["dit"]),
            decoder=PixelDecoderConfig.from_dict(d["decoder"]),
            vae=VaeConfig.from_dict(d["vae"]) if d.get("vae") else None,
            target=d.get("target", "clip"),
            objective=d.get("objective", "flow_matching"),
            flow=FlowMatchingConfig(**d.get("flow", {})),
            tokenizer_corpus_scenes=d.get("tokenizer_corpus_scenes", 3000),
        )


def tiny_config(**overrides: Any) -> Blip3oConfig:
    """The ShapesWorld miniature: every component small enough to train on a laptop CPU."""
    backbone = BackboneConfig.preset("tiny")
    clip = ClipConfig()  # 64x64 -> 8x8 = 64 patch tokens x 128 (the release's 64-token count)
    dit = DiTConfig(
        input_size=clip.target_grid,
        patch_size=1,
        in_channels=clip.target_channels,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        multiple_of=32,
        latent_embedding_size=backbone.hidden_size,
    )
    decoder = PixelDecoderConfig(feature_dim=clip.feature_dim, num_feature_tokens=clip.num_target_tokens)
    return replace(Blip3oConfig(backbone=backbone, clip=clip, dit=dit, decoder=decoder), **overrides)


def _check_query_count(backbone_dir: Path, n_queries: int) -> None:
    """The saved queries must be as many as the config says (a clear error instead of a shape mismatch)."""
    path = backbone_dir / QUERIES_FILE
    try:
        with safe_open(path, "pt") as f:
            shape = tuple(f.get_slice("latent_queries").get_shape())
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"cannot read the learnable queries {path}: {err}") from err
    if len(shape) != 3 or shape[1] != n_queries:
        raise ModelLoadError(
            f"query count mismatch: the config asks for {n_queries} queries, {path} holds shape {shape}"
        )


def _check_component_configs(config_path: Path, config: Blip3oConfig, **components: nn.Module | None) -> None:
    """Each component is built from its own folder's config; the top config.json must say the same.

    A hand-edited top config that disagrees with a component's would otherwise be ignored for the weights yet
    saved as the "resolved config" of every later checkpoint: fail here, naming each disagreeing field.
    """
    problems = []
    for name, component in components.items():
        expected = getattr(config, name)
        if component is None or expected is None:  # only the optional vae can be absent
            if component is not None:
                problems.append(f"{name}: a {name}/ folder but none in {CONFIG_FILE}")
            elif expected is not None:
                problems.append(f"{name}: in {CONFIG_FILE} but no {name}/ folder")
            continue
        for f in fields(expected):
            want, have = getattr(expected, f.name), getattr(component.config, f.name)
            if want != have:
                problems.append(
                    f"{name}.{f.name}: {want!r} in {CONFIG_FILE}, {have!r} in {name}/{CONFIG_FILE}"
                )
    if problems:
        raise ModelLoadError(
            f"{config_path} disagrees with its components' own configs (edit both, or re-save the model): "
            + "; ".join(problems)
        )


def storage_dtype_name(dtype: torch.dtype) -> str:
    """The config.json name of a storage dtype; ValueError for one weights cannot be stored in."""
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"weights can be stored as {', '.join(STORAGE_DTYPES)}, not {dtype}")


def cast_weight_files(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite every safetensors file under `directory` with its float32 matrices stored as `dtype`.

    Done on the files, after each component has saved itself in its library's format, so that no component's
    own save code has to know about storage precision. Only tensors of two or more dimensions are cast (they
    hold nearly all the bytes); vectors and scalars (biases, norms) stay float32, and so does any tensor that
    `dtype` cannot hold (values beyond its range would become inf). CLIP's fitted feature statistics, the
    principal-component basis included, are data statistics rather than weights and stay float32 whole.
    """
    for path in sorted(directory.rglob("*.safetensors")):
        if path.name == FEATURE_STATS_NAME:
            continue
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        state = load_file(path)
        for key, tensor in state.items():
            if tensor.dtype != torch.float32 or tensor.dim() < 2:
                continue
            cast = tensor.to(dtype)
            if torch.isfinite(cast).all() or not torch.isfinite(tensor).all():
                state[key] = cast
        save_file(state, path, metadata=metadata)


def tiny_vae_config(**overrides: Any) -> Blip3oConfig:
    """The miniature with VAE latents as the DiT's target (the design study's MetaQuery-style variant):
    a 16x16x4 latent grid, i.e. 256 tokens where CLIP has 64."""
    base = tiny_config()
    vae = VaeConfig()
    dit = replace(base.dit, in_channels=vae.latent_channels, input_size=vae.latent_size)
    return replace(base, vae=vae, target="vae", dit=dit, **overrides)


class Blip3o(nn.Module):
    """The unified model. Components: backbone (+ queries), dit, clip, decoder, and vae for the VAE target."""

    def __init__(
        self,
        config: Blip3oConfig,
        backbone: Backbone,
        clip: ClipEncoder,
        decoder: PixelDecoder,
        dit: DiT | None = None,
        vae: Vae | None = None,
    ):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.dit = dit if dit is not None else DiT(config.dit)
        self.clip = clip
        self.decoder = decoder
        self.vae = vae
        if config.target == "vae" and vae is None:
            raise ValueError("target 'vae' needs a Vae component")
        self.objective = build_objective(config.objective, config.flow)

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Blip3oConfig, seed: int = 0) -> Blip3o:
        """A randomly initialised model; the miniature's tokenizer is trained here on ShapesWorld text."""
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(
            shapes_corpus(config.tokenizer_corpus_scenes, seed=seed), vocab_size=config.backbone.vocab_size
        )
        backbone = Backbone.from_config(config.backbone, tokenizer)
        ids = backbone.token_ids
        clip_config = replace(
            config.clip,
            text_vocab_size=config.backbone.vocab_size,
            pad_token_id=ids["pad"],
            bos_token_id=ids["im_start"],
            eos_token_id=ids["im_end"],
        )
        config = replace(config, clip=clip_config)
        vae = Vae(config.vae) if config.vae is not None else None
        return cls(config, backbone, ClipEncoder(clip_config), PixelDecoder(config.decoder), vae=vae)

    @property
    def device(self) -> torch.device:
        return self.backbone.latent_queries.device

    @property
    def tokenizer(self):
        return self.backbone.processor.tokenizer

    # ---- inputs ---------------------------------------------------------------------------------------------

    def clip_text_inputs(self, captions: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Token ids for the CLIP text tower (the backbone's tokenizer, left padded, truncated)."""
        max_length = max_length or self.config.clip.text_max_length
        enc = self.tokenizer(
            captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    @torch.no_grad()
    def encode_target(self, images: list[Image.Image]) -> torch.Tensor:
        """What the DiT learns to generate, for real images: (B, C, h, w)."""
        if self.config.target == "clip":
            return tokens_to_grid(self.clip.features_to_target(self.encode_image(images)))  # (B, C, g, g)
        pixels = images_to_tensor(images).to(self.device)  # (B, 3, H, W) in [-1, 1]
        return self.vae.encode(pixels)  # (B, C, h, w)

    @torch.no_grad()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        """Normalised CLIP feature tokens (B, N, D) of images."""
        return self.clip.encode_image(self.clip.preprocess(images).to(self.device))

    @torch.no_grad()
    def decoder_features(
        self, images: list[Image.Image], target_noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the pixel decoder is trained on: normalised CLIP tokens (B, N, D) as the DiT's target keeps them.

        With `target_components` = k the decoder only ever sees generated targets mapped back from k
        components, so it learns from real tokens cut the same way; else these are `encode_image`'s tokens.
        `target_noise` (B, N, C), in the target's units, is added before mapping back (conditioning
        augmentation, `PixelDecoderConfig.condition_noise`).
        """
        features = self.encode_image(images)  # (B, N, D)
        if self.config.target != "clip":
            return features
        target = self.clip.features_to_target(features)  # (B, N, C); the features themselves without k
        if target_noise is not None:
            target = target + target_noise.to(target)  # (B, N, C)
        elif not self.clip.config.target_components:
            return features
        return self.clip.target_to_features(target)  # (B, N, D)

    def set_condition_word_tokens(self, words: int) -> Blip3o:
        """Give the generation condition `words` word tokens (`BackboneConfig.condition_word_tokens`) in place and
        return the model. No weight is added or changed (the words are the backbone's own embedding rows), so a
        trained model can go on training with them; what it generates changes once they are read."""
        self.backbone.config = replace(self.backbone.config, condition_word_tokens=words)
        self.config = replace(self.config, backbone=self.backbone.config)
        return self

    def set_guidance_interval(self, sigma_min: float, sigma_max: float, outside: float = 0.0) -> Blip3o:
        """Sample with guidance at full weight only for noise levels in [sigma_min, sigma_max], and at
        1 + outside (w - 1) elsewhere (`FlowMatchingConfig.cfg_sigma_min/max`, `cfg_outside`), in place; returns
        the model. Saved with it, so a model saved afterwards samples the same way. ValueError for bad bounds."""
        flow = replace(
            self.config.flow, cfg_sigma_min=sigma_min, cfg_sigma_max=sigma_max, cfg_outside=outside
        )
        self.config = replace(self.config, flow=flow)
        self.objective = build_objective(self.config.objective, flow)
        return self

    def set_decoder_candidates(self, candidates: int) -> Blip3o:
        """Decode each DiT output `candidates` times and keep the one that agrees best with it
        (`PixelDecoderConfig.sample_candidates`), in place; returns the model. Saved with it. ValueError for
        candidates < 1."""
        decoder = replace(self.config.decoder, sample_candidates=candidates)
        self.decoder.config = decoder
        self.config = replace(self.config, decoder=decoder)
        return self

    def condition(self, prompts: list[str]) -> torch.Tensor:
        """The generation condition for text-to-image prompts: the backbone's hidden states at the query positions,
        after its word tokens when `backbone.condition_word_tokens` is set: (B, L, H), L = words + queries."""
        inputs = self.backbone.generation_inputs(prompts)
        return self.backbone.condition(
            inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        )

    # ---- inference -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def understand(
        self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 16
    ) -> list[str]:
        """Answer prompts about images (image + text -> text), batched greedy decoding."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        return self.backbone.understand(images, prompts, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def generate_target(
        self,
        prompts: list[str],
        steps: int | None = None,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
        count_guidance: float = 0.0,
    ) -> torch.Tensor:
        """Sample DiT outputs (CLIP feature grids or VAE latents) for prompts: (B, C, h, w).

        count_guidance > 0 steers each step towards the counts of each shape the prompts name, as CLIP's label
        head reads them (models/count_guidance.py; a CLIP target with an object label head only)."""
        if count_guidance and self.config.target == "vae":  # the label head reads CLIP targets, not latents
            raise ValueError("count guidance needs a CLIP target; this model generates VAE latents")
        steer = clip_count_steer(self.clip, prompts, count_guidance) if count_guidance else None
        cond = self.condition(prompts).float()  # (B, L, H)
        noise = initial_noise((len(prompts), *self.config.target_shape), generator, device=self.device)
        return self.objective.sample(self.dit, noise, cond, steps=steps, cfg_scale=cfg_scale, steer=steer)

    @torch.no_grad()
    def regenerate_target(
        self,
        target: torch.Tensor,
        prompts: list[str],
        start_sigma: float,
        noise: torch.Tensor,
        steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> torch.Tensor:
        """The DiT's own rendition of known targets (B, C, h, w): noised to `start_sigma`, sampled back (SDEdit).

        The result keeps the layout the target had at that noise level and has the DiT's finish below it,
        which is what the pixel decoder meets at inference. A flow-matching DiT only (the regression baseline
        has no trajectory to enter part-way)."""
        if self.config.objective != "flow_matching":
            raise ValueError(
                f"regenerate_target needs the flow-matching objective, not {self.config.objective!r}"
            )
        cond = self.condition(prompts).float()  # (B, L, H)
        state = interpolate(target.float(), noise.to(target.device, torch.float32), torch.tensor(start_sigma))
        return sample_euler(
            self.dit, state, cond, self.config.flow, steps, cfg_scale, start_sigma=start_sigma
        )  # (B, C, h, w)

    @torch.no_grad()
    def decode_target(
        self,
        target: torch.Tensor,
        decoder_steps: int | None = None,
        decoder_cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Image.Image]:
        """DiT outputs -> pixels: the diffusion decoder for CLIP features, the VAE decoder for latents.

        With `decoder.sample_candidates` K > 1 each output is decoded K times (one after another, from the same
        generator, so the first is the K = 1 decode) and the decode whose CLIP reading agrees best with the
        output is kept (models/decode_choice.py): K times the decoder's work, plus one CLIP pass per decode."""
        if self.config.target == "vae":
            return tensor_to_images(self.vae.decode(target))
        features = self.clip.target_to_features(grid_to_tokens(target))  # (B, N, D)
        candidates = []
        for _ in range(self.config.decoder.sample_candidates):
            pixels = self.decoder.decode(
                features, steps=decoder_steps, cfg_scale=decoder_cfg_scale, generator=generator
            )  # (B, 3, H, W)
            candidates.append(tensor_to_images(pixels))
        if len(candidates) == 1:
            return candidates[0]
        # Read back from the saved 8-bit images, as a user's file would be.
        disagreements = decode_disagreements(self.clip, target, [self.encode_target(c) for c in candidates])
        best = best_candidate(disagreements)  # (B,)
        return [candidates[int(k)][row] for row, k in enumerate(best)]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | str,
        num_images: int = 1,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        decoder_steps: int | None = None,
        decoder_cfg_scale: float | None = None,
        batch_size: int = 64,
        count_guidance: float = 0.0,
    ) -> list[Image.Image]:
        """Text -> images: `num_images` per prompt, prompt-major order. Same seed, same images.
        count_guidance: see `generate_target` (0: off)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or num_images < 1:
            raise ValueError("need at least one prompt and num_images >= 1")
        expanded = [p for p in prompts for _ in range(num_images)]
        generator = torch.Generator().manual_seed(seed)
        images: list[Image.Image] = []
        for start in range(0, len(expanded), batch_size):
            chunk = expanded[start : start + batch_size]
            target = self.generate_target(chunk, steps, cfg_scale, generator, count_guidance)
            images += self.decode_target(target, decoder_steps, decoder_cfg_scale, generator)
        return images

    # ---- save / load ----------------------------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | Path, dtype: torch.dtype = torch.float32, dit_int8: bool = False
    ) -> None:
        """Release layout: config.json, backbone/, dit/, clip/, decoder/ (and vae/), each HF-style.

        dtype: how the weight files store floats. torch.float16 halves the folder (the model bundled with the
        package must fit in 25 MB); `from_pretrained` upcasts such a model to float32, so only the rounding of
        the stored weights differs. The choice is recorded in config.json as "storage_dtype".
        dit_int8: store the DiT's large matrices as int8 with per-row scales (`blip3o.models.int8_storage`;
        a quarter of float32's bytes), recorded as "dit_storage": "int8".
        """
        dtype_name = storage_dtype_name(dtype)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory / "backbone")
        dit_dir = directory / "dit"
        dit_dir.mkdir(exist_ok=True)
        (dit_dir / CONFIG_FILE).write_text(json.dumps(self.config.dit.to_dict(), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.dit.state_dict().items()}
        # Quantized from the float32 weights, before any float16 cast of the files (which leaves int8 alone).
        save_file(quantize_state(state) if dit_int8 else state, dit_dir / DIT_WEIGHTS)
        self.clip.save_pretrained(directory / "clip")
        self.decoder.save_pretrained(directory / "decoder")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        if dtype != torch.float32:
            cast_weight_files(directory, dtype)
        # Written last: a folder with a config.json is a complete model.
        config = {**self.config.to_dict(), STORAGE_DTYPE_KEY: dtype_name}
        if dit_int8:
            config[DIT_STORAGE_KEY] = "int8"
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Blip3o:
        """Load a model saved by `save_pretrained` from a local directory (never the network)."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(f"{directory} is not a blip3o model folder: no {CONFIG_FILE}")
        try:
            raw = json.loads(config_path.read_text())
            config = Blip3oConfig.from_dict(raw)
            storage = raw.get(STORAGE_DTYPE_KEY, "float32")  # folders saved before the key existed: float32
            if storage not in STORAGE_DTYPES:
                raise ValueError(f"unknown {STORAGE_DTYPE_KEY} {storage!r}")
            if DIT_STORAGE_KEY in raw and raw[DIT_STORAGE_KEY] != "int8":
                raise ValueError(f"unknown {DIT_STORAGE_KEY} {raw[DIT_STORAGE_KEY]!r} (only 'int8' is known)")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ModelLoadError(f"{config_path} is not a valid blip3o config: {err}") from err
        _check_query_count(directory / "backbone", config.backbone.n_queries)

        def component(name: str, load):
            """Load one component; a failure names the component's folder and what went wrong."""
            try:
                return load(directory / name)
            except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as err:
                raise ModelLoadError(
                    f"cannot load the {name} of the model in {directory / name}: {err}"
                ) from err

        def load_dit(path: Path) -> DiT:
            dit = DiT(DiTConfig.from_dict(json.loads((path / CONFIG_FILE).read_text())))
            # int8 matrices (saved with dit_int8) come back as float32; float files pass unchanged.
            dit.load_state_dict(dequantize_state(load_file(path / DIT_WEIGHTS)), strict=True)
            return dit

        backbone = component("backbone", lambda p: Backbone.from_pretrained(p, dtype=torch.float32))
        dit = component("dit", load_dit)
        clip = component("clip", ClipEncoder.from_pretrained)
        decoder = component("decoder", PixelDecoder.from_pretrained)
        vae = component("vae", Vae.from_pretrained) if (directory / "vae").is_dir() else None
        _check_component_configs(
            config_path, config, backbone=backbone, dit=dit, clip=clip, decoder=decoder, vae=vae
        )
        model = cls(config, backbone, clip, decoder, dit=dit, vae=vae)
        if storage != "float32":
            # Half-precision storage only: the model computes in float32 whatever the files hold (each
            # library loads such files in its own way; this makes every component agree).
            model = model.float()
        return model.eval()
