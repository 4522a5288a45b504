"""The autoregressive backbone: Qwen2.5-VL plus BLIP3-o's learnable queries.

Understanding is the VLM's own path (image + text -> text, with its vision tower). Generation conditioning
follows the release (fixtures/official_dit/flow_matching_official.md, section 2): the chat-formatted prompt
"Please generate image based on the following caption: ...", then an image-start token `[IMG]`, then
`n_queries` placeholder tokens whose input embeddings are replaced by `latent_queries`; the text decoder's
last-layer hidden states (after its final RMSNorm) at those positions are the condition, (B, n_queries, H).

Layout decisions (differences from the release are deliberate and listed):
- Left padding everywhere, so the queries are the last `n_queries` positions of every row and the next
  token of a generation batch is the last column. The release right-pads in training (query positions then
  differ per row) and runs unpadded at inference.
- Position ids are counted over real tokens only (cumsum of the attention mask - 1). The release passes
  none, i.e. 0..T-1, which equals ours for an unpadded row; with left padding the default would shift a
  padded row's positions, so a caption's condition would depend on the batch it is in.
- The prompt ends with the open assistant turn ("<|im_start|>assistant\\n") in training and inference alike;
  the release closes the turn in training but not at inference.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from blip3o.data.tokenizer import (
    GENERATION_TEMPLATE,
    SPECIAL_TOKENS,
    ImageTextProcessor,
    build_processor,
    reject_special_tokens,
    special_token_ids,
)

Turns = str | list[str]  # one user turn, or the questions of a conversation (each answered in turn)
LossAverage = Literal["token", "sample"]  # how the understanding loss averages (see understanding_loss)
LOSS_AVERAGES: tuple[str, ...] = get_args(LossAverage)

BACKBONE_CONFIG_FILE = "blip3o_backbone.json"
QUERIES_FILE = "blip3o_queries.safetensors"  # kept apart so model.safetensors stays a plain Qwen2.5-VL


@dataclass(frozen=True)
class BackboneConfig:
    """Shapes of the Qwen2.5-VL backbone and the BLIP3-o queries. Presets: `BackboneConfig.preset(name)`."""

    # Text decoder.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mrope_section: tuple[int, int, int]  # head_dim / 2 split over (temporal, height, width) rotary bands
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = False
    # Vision tower (its output is projected to hidden_size by the patch merger).
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_intermediate_size: int = 3420
    vision_num_heads: int = 16
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels per side of a windowed-attention window
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # the other vision blocks attend within windows
    tokens_per_second: int = 2
    # Image processor pixel budget (images are resized so that min_pixels <= H * W <= max_pixels).
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    # BLIP3-o.
    n_queries: int = 64
    # Std of the N(0, std^2) query init. The release uses 1.0. None means the std of the token embedding
    # table (~initializer_range = 0.02 when fresh): a from-scratch model's text embeddings are that small, and
    # N(0, 1) queries would dominate the residual stream at their positions over what they attend to.
    query_init_std: float | None = 1.0
    initializer_range: float = 0.02
    # Per-channel RMS of a fixed 2D sinusoidal code of each merged vision token's (row, column), added to the
    # tokens the language model reads (0: none, as Qwen2.5-VL). Why: Qwen2.5-VL gives image positions to the
    # language model through mRoPE only, whose width band holds the lowest rotary frequencies (the miniature's
    # 4 columns differ by at most 5e-4 rad), and rotary phases shape attention weights but never enter the
    # values, so an attended token's position must be in its content. The tower's own content hardly holds it:
    # the cell explains 1.4% of the bundled model's token variance (see vision_position_code).
    vision_position_scale: float = 0.0
    # Deal the language model's rotary frequencies to the (temporal, height, width) bands in turn, highest
    # first (Qwen3-VL's interleaved mRoPE), instead of in contiguous chunks (Qwen2.5-VL, False). Why: chunked,
    # the width band gets the lowest frequencies, so image columns are nearly indistinguishable by position
    # (see vision_position_scale); interleaved, every band spans the spectrum. Text tokens carry one position
    # in all three bands, so for text only which rotary pair turns at which frequency changes. Tried in the
    # bundle's stage 1 (session 43, 8,000 steps): ShapesVQA 0.762 against 0.704, relations at chance in both
    # (docs/bench/understanding_position_trials.txt); no preset uses it.
    mrope_interleaved: bool = False
    # The generation condition's word tokens: the input embeddings of the last N positions before the queries
    # (the caption's end and the template's last tokens; zeros where a short prompt leaves none), put before
    # the query states (0: none, as BLIP3-o). Why: the miniature backbone's stage 1 never tells " left" from
    # " right" (input embeddings at cosine 0.99); the query states carry left-vs-right in no form a resampler
    # learns to read on held-out prompts (chance after 1,500 steps, while above / below is read at 1.000), but
    # with the words' own embeddings it reads it at 1.000 by step 1,000 (bench/relation_reading.py readout;
    # docs/bench/object_target.txt, session 29).
    condition_word_tokens: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide into num_heads, and num_heads into num_kv_heads")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}"
            )
        if self.condition_word_tokens < 0:
            raise ValueError(f"condition_word_tokens must be >= 0, got {self.condition_word_tokens}")
        if any(i >= self.vision_depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {self.fullatt_block_indexes} exceed vision_depth")

    @classmethod
    def preset(cls, name: str, **overrides) -> BackboneConfig:
        if name not in BACKBONE_PRESETS:
            raise KeyError(f"unknown backbone preset {name!r}; known: {sorted(BACKBONE_PRESETS)}")
        return replace(BACKBONE_PRESETS[name], **overrides)

    def hf_config(self, token_ids: dict[str, int] | None = None) -> Qwen2_5_VLConfig:
        """The transformers config. `token_ids` (from `special_token_ids`) places the vision and chat tokens;
        None keeps transformers' defaults, which are the Qwen2.5-VL tokenizer's ids."""
        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
            },
        )
        vision = dict(
            depth=self.vision_depth,
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_heads=self.vision_num_heads,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size,
            window_size=self.window_size,
            fullatt_block_indexes=list(self.fullatt_block_indexes),
            tokens_per_second=self.tokens_per_second,
            out_hidden_size=self.hidden_size,
            initializer_range=self.initializer_range,
        )
        ids = {}
        if token_ids is not None:
            text.update(pad_token_id=token_ids["pad"], eos_token_id=token_ids["im_end"], bos_token_id=None)
            ids = dict(
                image_token_id=token_ids["image_pad"],
                video_token_id=token_ids["video_pad"],
                vision_start_token_id=token_ids["vision_start"],
                vision_end_token_id=token_ids["vision_end"],
            )
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=self.tie_word_embeddings, **ids
        )


BACKBONE_PRESETS: dict[str, BackboneConfig] = {
    # ShapesWorld on CPU: 64x64 images -> 8x8 patches of 8 px -> 16 merged vision tokens.
    "tiny": BackboneConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 6, 6),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        vision_depth=2,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_num_heads=4,
        patch_size=8,
        window_size=32,  # 2x2 merged tokens per window: a 64 px image has 4 windows
        fullatt_block_indexes=(1,),
        min_pixels=64 * 64,
        max_pixels=64 * 64,
        query_init_std=None,
    ),
    # Qwen2.5-VL-3B-Instruct (BLIP3-o "4B").
    "qwen2.5-vl-3b": BackboneConfig(
        vocab_size=151_936,
        hidden_size=2048,
        intermediate_size=11_008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        mrope_section=(16, 24, 24),
        tie_word_embeddings=True,
    ),
    # Qwen2.5-VL-7B-Instruct (BLIP3-o "8B").
    "qwen2.5-vl-7b": BackboneConfig(
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18_944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        mrope_section=(16, 24, 24),
    ),
}


def vision_position_code(grid_thw: torch.Tensor, dim: int, merge: int, scale: float) -> torch.Tensor:
    """(sum of N, dim): for each image's merged tokens in raster order, sinusoids of the token's row in the
    first half of the channels and of its column in the second half (frequencies 1 / 100^(2k/half), so a grid
    of up to ~100 tokens a side is told apart), with per-channel RMS `scale`."""
    half = dim // 2
    freqs = 100.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half / 2,)

    def code(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, half)
        angles = pos.double()[:, None] * freqs[None]  # (N, half / 2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (N, half)

    codes = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h // merge).repeat_interleave(w // merge).repeat(t)  # (N,)
        cols = torch.arange(w // merge).repeat(t * (h // merge))  # (N,)
        codes.append(torch.cat([code(rows), code(cols)], dim=-1))  # (N, 2 * half)
    out = torch.cat(codes) * (scale * 2**0.5)  # sinusoids have RMS 1/sqrt(2)
    return F.pad(out, (0, dim - 2 * half)).float()  # (sum of N, dim)


def interleaved_mrope_order(section: tuple[int, int, int]) -> list[int]:
    """Frequency indices (0 = highest) for the contiguous (temporal, height, width) chunks transformers reads,
    dealt to the three bands in turn until each band has its `section` share: (4, 6, 6) gives temporal
    0 3 6 9, height 1 4 7 10 12 14, width 2 5 8 11 13 15."""
    left, bands, index = list(section), ([], [], []), 0
    while index < sum(section):
        for band in range(3):
            if left[band] and index < sum(section):
                bands[band].append(index)
                left[band] -= 1
                index += 1
    return [*bands[0], *bands[1], *bands[2]]


def set_interleaved_mrope(rotary: nn.Module, section: tuple[int, int, int]) -> None:
    """Reorder a Qwen2.5-VL text rotary embedding's (non-persistent) frequencies into the interleaved layout.
    Computed from the module's config, not from its current buffer, so calling it twice changes nothing. Buffers
    still on meta are skipped: `Backbone.reset_rotary()` after `to_empty()` fills them in this layout."""
    default, _ = rotary.compute_default_rope_parameters(rotary.config)  # (head_dim / 2,), highest first
    order = torch.tensor(interleaved_mrope_order(section))
    with torch.no_grad():
        for buffer in (rotary.inv_freq, rotary.original_inv_freq):
            if not buffer.is_meta:
                buffer.copy_(default[order].to(buffer.device, buffer.dtype))


def _add_vision_position_code(module: nn.Module, args, kwargs, output, scale: float):
    """Forward hook on the vision tower: adds the position code to its merged tokens (`pooler_output`)."""
    grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
    merged = output.pooler_output  # (sum of N, H)
    code = vision_position_code(grid_thw, merged.shape[-1], module.spatial_merge_size, scale)
    output.pooler_output = merged + code.to(merged.device, merged.dtype)
    return output


def _as_turns(prompt: Turns, answer: Turns) -> tuple[list[str], list[str]]:
    """(questions, answers) of one sample: a single prompt and answer, or two equally long lists."""
    questions = [prompt] if isinstance(prompt, str) else list(prompt)
    replies = [answer] if isinstance(answer, str) else list(answer)
    if not questions or len(questions) != len(replies):
        raise ValueError(f"a conversation needs as many answers as questions (>= 1): {prompt!r} / {answer!r}")
    return questions, replies


def _left_pad(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    """(B, T) with each row right-aligned."""
    width = max(len(r) for r in rows)
    return torch.tensor([[pad_value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift a row: (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


class Backbone(nn.Module):
    """Qwen2.5-VL (`self.vlm`) plus `latent_queries` (1, n_queries, hidden).

    `processor` (tokenizer + image processor) is needed by the methods that take text or images; the released
    presets can be built without one (shapes only, e.g. on the meta device).
    """

    def __init__(
        self,
        config: BackboneConfig,
        processor: ImageTextProcessor | None = None,
        vlm: Qwen2_5_VLForConditionalGeneration | None = None,
    ):
        super().__init__()
        self.config = config
        self.processor = processor
        self.token_ids = special_token_ids(processor.tokenizer) if processor is not None else None
        if processor is not None and len(processor.tokenizer) > config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(processor.tokenizer)} tokens, vocab_size is {config.vocab_size}"
            )
        self.vlm = (
            vlm if vlm is not None else Qwen2_5_VLForConditionalGeneration(config.hf_config(self.token_ids))
        )
        self.latent_queries = nn.Parameter(torch.empty(1, config.n_queries, config.hidden_size))
        self.reset_queries(config.query_init_std)
        if config.mrope_interleaved:
            set_interleaved_mrope(self.vlm.model.language_model.rotary_emb, config.mrope_section)
        if config.vision_position_scale:
            self.vlm.model.visual.register_forward_hook(
                functools.partial(_add_vision_position_code, scale=config.vision_position_scale),
                with_kwargs=True,
            )

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: BackboneConfig, tokenizer: PreTrainedTokenizerFast) -> Backbone:
        """A randomly initialised backbone with a processor built from `tokenizer` and the config's vision shapes."""
        processor = build_processor(
            tokenizer,
            patch_size=config.patch_size,
            merge_size=config.spatial_merge_size,
            temporal_patch_size=config.temporal_patch_size,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        )
        return cls(config, processor)

    def reset_rotary(self) -> None:
        """Recompute the rotary frequency buffers (non-persistent, so never in a checkpoint) of the vision tower
        and the text decoder, in this config's layout: needed after building on meta and `to_empty()`, which
        leaves them uninitialised. transformers' own re-initialisation would restore the default mRoPE
        layout, undoing `mrope_interleaved`; this re-applies it."""
        with torch.no_grad():
            for module in self.vlm.modules():
                if not hasattr(module, "original_inv_freq"):
                    continue
                if module.rope_type not in ("default", "axial"):  # scaled variants have their own init
                    raise NotImplementedError(f"reset_rotary: rope_type {module.rope_type!r}")
                compute = getattr(module, "compute_axial_rope_parameters", None)
                compute = compute or module.compute_default_rope_parameters
                frequencies, _ = compute(module.config)  # (rotary dim / 2,)
                for buffer in (module.inv_freq, module.original_inv_freq):
                    buffer.copy_(frequencies.to(buffer.device, buffer.dtype))
        if self.config.mrope_interleaved:
            set_interleaved_mrope(self.vlm.model.language_model.rotary_emb, self.config.mrope_section)

    def reset_queries(self, std: float | None = None) -> None:
        """Draw the queries from N(0, std^2); None: the std of the current input embedding table (e.g. to
        restart the queries on the scale of a trained stage-1 backbone's embeddings)."""
        if std is None:
            weight = self.vlm.get_input_embeddings().weight
            std = self.config.initializer_range if weight.is_meta else weight.detach().float().std().item()
        with torch.no_grad():
            self.latent_queries.normal_(0.0, std)

    def freeze_language_model(self) -> None:
        """Freeze the whole VLM (vision tower, text decoder, LM head), as the release's stage 2 does: only
        `latent_queries` (and the DiT, elsewhere) keep requires_grad."""
        self.vlm.requires_grad_(False)

    def save_pretrained(self, directory: str | Path) -> None:
        """HF layout: config.json + model.safetensors (a plain Qwen2.5-VL), tokenizer and processor files,
        plus the BLIP3-o additions (blip3o_backbone.json, blip3o_queries.safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vlm.save_pretrained(directory)
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        (directory / BACKBONE_CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({"latent_queries": self.latent_queries.detach().contiguous()}, directory / QUERIES_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> Backbone:
        """Load from a local directory written by `save_pretrained` (never touches the network)."""
        directory = Path(directory)
        fields = json.loads((directory / BACKBONE_CONFIG_FILE).read_text())
        for key in ("mrope_section", "fullatt_block_indexes"):
            fields[key] = tuple(fields[key])
        config = BackboneConfig(**fields)
        processor = ImageTextProcessor.from_pretrained(directory, local_files_only=True)
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, dtype=dtype or "auto", local_files_only=True
        )
        backbone = cls(config, processor, vlm=vlm)
        with torch.no_grad():
            backbone.latent_queries.copy_(load_file(directory / QUERIES_FILE)["latent_queries"])
        return backbone.to(vlm.dtype)

    # ---- generation conditioning --------------------------------------------------------------------------

    def _require_processor(self) -> ImageTextProcessor:
        if self.processor is None:
            raise RuntimeError(
                "this Backbone was built without a processor (tokenizer); text methods need one"
            )
        return self.processor

    def generation_inputs(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded text-to-image sequences: chat prompt, `[IMG]`, then n_queries query placeholders.

        Returns input_ids and attention_mask, both (B, T); the queries are the last n_queries columns."""
        tokenizer = self._require_processor().tokenizer
        ids = self.token_ids
        tail = [ids["image_start"]] + [ids["query"]] * self.config.n_queries
        rows = []
        for caption in captions:
            reject_special_tokens(tokenizer, caption)
            turn = [{"role": "user", "content": GENERATION_TEMPLATE.format(caption=caption)}]
            prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            rows.append(tokenizer(prompt, add_special_tokens=False).input_ids + tail)
        input_ids = _left_pad(rows, ids["pad"])  # (B, T)
        attention_mask = _left_pad([[1] * len(r) for r in rows], 0)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The generation condition: last-layer (post-norm) hidden states at the query positions, (B, n_queries, H),
        after `config.condition_word_tokens` word tokens when that is set: (B, words + n_queries, H).

        The placeholders' embeddings are replaced by `latent_queries`, so gradients reach the queries even
        with the VLM frozen."""
        queries = self.generation_hidden_states(input_ids, attention_mask)[:, -self.config.n_queries :]
        if not self.config.condition_word_tokens:
            return queries  # (B, Q, H)
        return torch.cat([self.condition_words(input_ids, attention_mask).to(queries.dtype), queries], dim=1)

    def condition_words(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Input embeddings of the last `config.condition_word_tokens` positions before the queries, padding and
        missing positions zero: (B, words, H). No language-model layer runs on them."""
        words, n_queries = self.config.condition_word_tokens, self.config.n_queries
        if not words:  # a [-0:] slice would take every position
            return self.latent_queries.new_zeros(
                (len(input_ids), 0, self.config.hidden_size)
            )  # the model's dtype
        ids, mask = (
            input_ids[:, :-n_queries][:, -words:],
            attention_mask[:, :-n_queries][:, -words:],
        )  # (B, <=N)
        embeds = self.vlm.model.language_model.embed_tokens(ids) * mask.unsqueeze(-1)  # (B, <=N, H)
        return F.pad(embeds, (0, 0, words - embeds.shape[1], 0))  # (B, N, H), zeros on the left

    def generation_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer (post-norm) hidden states of a text-to-image sequence at every position, (B, T, H): the
        prompt's, then the queries' (`condition`). Probes read the prompt's part too."""
        n_queries = self.config.n_queries
        self._check_query_layout(input_ids)
        language_model = self.vlm.model.language_model
        text_embeds = language_model.embed_tokens(input_ids[:, :-n_queries])  # (B, T - n_queries, H)
        queries = self.latent_queries.to(text_embeds.dtype).expand(
            input_ids.shape[0], -1, -1
        )  # (B, n_queries, H)
        inputs_embeds = torch.cat([text_embeds, queries], dim=1)  # (B, T, H)
        hidden = language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),  # (B, T), shared by the 3 mRoPE bands
            use_cache=False,
        ).last_hidden_state  # (B, T, H), after the final RMSNorm
        return hidden

    def _check_query_layout(self, input_ids: torch.Tensor) -> None:
        query_id, n_queries = self.token_ids["query"], self.config.n_queries
        is_query = input_ids == query_id  # (B, T)
        if not (is_query[:, -n_queries:].all() and not is_query[:, :-n_queries].any()):
            raise ValueError(
                f"expected exactly the last {n_queries} tokens of every row to be {SPECIAL_TOKENS.query} "
                "(left-padded sequences from generation_inputs)"
            )

    # ---- understanding ------------------------------------------------------------------------------------

    @property
    def vision_tower(self) -> nn.Module:
        """Qwen2.5-VL's vision encoder with its patch merger: what the "vision" stage trains, `freeze_vision` freezes."""
        return self.vlm.model.visual

    def vision_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """The merged vision tokens the language model reads, (B, N, H), in raster order of the merged grid.

        Every image must give the same token count (ShapesWorld: 64x64 -> 4x4 merged tokens)."""
        processor = self._require_processor()
        enc = processor.image_processor(images=images, return_tensors="pt")
        device = self.latent_queries.device
        merged = self.vision_tower(
            enc["pixel_values"].to(device, self.vlm.dtype), grid_thw=enc["image_grid_thw"].to(device)
        ).pooler_output  # (sum of N, H): the visual model undoes its window order before returning
        return merged.reshape(len(images), -1, merged.shape[-1])  # (B, N, H)

    def _prompt_texts(self, prompts: list[str]) -> list[str]:
        tokenizer = self._require_processor().tokenizer
        texts = []
        for prompt in prompts:
            reject_special_tokens(tokenizer, prompt)
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            texts.append(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False))
        return texts

    def _follow_up_ids(self, question: str) -> list[int]:
        """A later user turn and the open assistant turn, as the chat template writes them after an answer's
        <|im_end|>: "\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"."""
        tokenizer = self._require_processor().tokenizer
        reject_special_tokens(tokenizer, question)
        s, e = SPECIAL_TOKENS.im_start, SPECIAL_TOKENS.im_end
        text = f"\n{s}user\n{question}{e}\n{s}assistant\n"
        return tokenizer(text, add_special_tokens=False).input_ids

    def understanding_inputs(
        self, images: list[Image.Image], prompts: list[Turns], answers: list[Turns]
    ) -> dict[str, torch.Tensor]:
        """Left-padded stage-1 batch: image + prompt in the user turn, the answer as the assistant turn.

        A prompt may be a list of questions, with a matching list of answers: a conversation about the image
        (the image in the first user turn), as LLaVA trains on all of an image's questions in one sequence.
        labels are every answer's tokens and its closing <|im_end|> (so the model learns to stop), -100
        elsewhere."""
        if not len(images) == len(prompts) == len(answers):
            raise ValueError("images, prompts and answers must have the same length")
        conversations = [_as_turns(p, a) for p, a in zip(prompts, answers, strict=True)]
        processor = self._require_processor()
        tokenizer, im_end = processor.tokenizer, self.token_ids["im_end"]
        first_prompts = [questions[0] for questions, _ in conversations]
        encoded = processor(text=self._prompt_texts(first_prompts), images=images, return_tensors=None)
        rows, labels, mm_types = [], [], []
        for prompt_ids, prompt_types, (questions, replies) in zip(
            encoded["input_ids"], encoded["mm_token_type_ids"], conversations, strict=True
        ):
            row, label = list(prompt_ids), [-100] * len(prompt_ids)
            for turn, (question, answer) in enumerate(zip(questions, replies, strict=True)):
                if turn:
                    follow_up = self._follow_up_ids(question)
                    row += follow_up
                    label += [-100] * len(follow_up)
                reject_special_tokens(tokenizer, answer)
                answer_ids = [*tokenizer(answer, add_special_tokens=False).input_ids, im_end]
                row += answer_ids
                label += answer_ids
            rows.append(row)
            labels.append(label)
            mm_types.append(list(prompt_types) + [0] * (len(row) - len(prompt_ids)))
        return {
            "input_ids": _left_pad(rows, self.token_ids["pad"]),  # (B, T)
            "attention_mask": _left_pad([[1] * len(r) for r in rows], 0),  # (B, T)
            "labels": _left_pad(labels, -100),  # (B, T)
            "mm_token_type_ids": _left_pad(mm_types, 0),  # (B, T): 1 at image tokens
            "pixel_values": torch.as_tensor(encoded["pixel_values"]),  # (sum of patches, C * t * p * p)
            "image_grid_thw": torch.as_tensor(encoded["image_grid_thw"]),  # (B, 3)
        }

    def understanding_loss(
        self,
        images: list[Image.Image],
        prompts: list[Turns],
        answers: list[Turns],
        average: LossAverage = "token",
    ) -> torch.Tensor:
        """Stage 1 (captioning, QA): next-token cross-entropy over the answer tokens.

        average "token": the mean over every answer token of the batch (transformers' own loss), so a 100-token
        caption weighs 30x a 3-token answer. "sample": each sample's mean, then the mean over samples, so short
        answers (ShapesVQA's one word) get an equal share of the gradient."""
        if average not in LOSS_AVERAGES:
            raise ValueError(f"average must be one of {LOSS_AVERAGES}, got {average!r}")
        batch = self.understanding_inputs(images, prompts, answers)
        device = self.latent_queries.device
        batch = {k: v.to(device) for k, v in batch.items()}
        if average == "token":
            return self.vlm(**batch, use_cache=False).loss
        labels = batch.pop("labels")  # (B, T)
        logits = self.vlm(**batch, use_cache=False).logits.float()  # (B, T, V)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        per_token = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )  # (B, T-1)
        counted = (targets != -100).float()  # (B, T-1)
        per_sample = (per_token * counted).sum(1) / counted.sum(1).clamp(min=1)  # (B,)
        return per_sample.mean()

    @torch.no_grad()
    def understand(
        self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 16
    ) -> list[str]:
        """Batched greedy answers (KV cache, left padding), special tokens stripped."""
        processor = self._require_processor()
        batch = processor(
            text=self._prompt_texts(prompts),
            images=images,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        ).to(self.latent_queries.device)
        generated = self.vlm.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.token_ids["im_end"],
            pad_token_id=self.token_ids["pad"],
        )  # (B, T + new)
        new_tokens = generated[:, batch["input_ids"].shape[1] :]  # (B, new)
        return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
