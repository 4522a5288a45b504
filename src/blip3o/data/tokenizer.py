"""A small byte-level BPE tokenizer for ShapesWorld, wrapped as a transformers fast tokenizer.

The released BLIP3-o uses Qwen2.5-VL's 151k-token vocabulary; ShapesWorld needs a few hundred tokens, so the
tiny backbone gets its own tokenizer trained here. It carries the same *named* special tokens the
Qwen2.5-VL processor and the BLIP3-o generation path look up (chat turns, vision markers, the image-start
marker and the query placeholder). Code elsewhere asks for a token by name through `special_token_id`,
never by a numeric id.

Byte-level BPE means no text is ever out of vocabulary and decode(encode(text)) == text exactly; training on
ShapesWorld text (`shapes_corpus`) only decides which words become single tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass
from importlib import resources

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens, by role. The strings follow Qwen2.5-VL's where the processor expects them."""

    pad: str = "<|endoftext|>"
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"  # ends every chat turn; the end-of-sequence token for generation
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"  # the processor expands it to one token per merged vision patch
    video_pad: str = "<|video_pad|>"  # unused, but Qwen2_5_VLProcessor looks it up at construction
    image_start: str = "[IMG]"  # BLIP3-o: marks the start of the generated image (the queries follow)
    query: str = "<|query|>"  # BLIP3-o: one placeholder per learnable query (`<image>` in the release)


SPECIAL_TOKENS = SpecialTokens()

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
GENERATION_TEMPLATE = "Please generate image based on the following caption: {caption}"


def _chat_template(tokens: SpecialTokens) -> str:
    """ChatML (system/user/assistant). Content is a string or a list of {"type": "image"} / {"type": "text"}
    items; an image becomes vision_start + one image_pad + vision_end, which the processor expands. A
    conversation without a system turn gets the default system prompt, as Qwen2.5-VL's template does."""
    s, e = tokens.im_start, tokens.im_end
    image = tokens.vision_start + tokens.image_pad + tokens.vision_end
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        f"{{{{- '{s}system\\n{DEFAULT_SYSTEM_PROMPT}{e}\\n' -}}}}"
        "{%- endif -%}"
        f"{{{{- '{s}' + message['role'] + '\\n' -}}}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{{{{- '{image}' -}}}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        f"{{{{- '{e}\\n' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{s}assistant\\n' -}}}}{{%- endif -%}}"
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; `vocab_size` counts the 256 byte tokens and the special tokens."""
    specials = list(astuple(SPECIAL_TOKENS))
    min_size = 256 + len(specials)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {len(specials)} specials)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # first, so they get the lowest ids
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return wrap_tokenizer(bpe)


def wrap_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers.Tokenizer` with the special-token roles and the chat template."""
    t = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=t.pad,
        eos_token=t.im_end,
        # Named roles: the Qwen2.5-VL processor reads `tokenizer.image_token` / `video_token`.
        extra_special_tokens={
            "im_start_token": t.im_start,
            "vision_start_token": t.vision_start,
            "vision_end_token": t.vision_end,
            "image_token": t.image_pad,
            "video_token": t.video_pad,
            "image_start_token": t.image_start,
            "query_token": t.query,
        },
        # Left padding: a batch's last positions line up across rows (the BLIP3-o queries, the next token).
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=_chat_template(t),
    )
    special_token_ids(tokenizer)  # fails loudly if a role did not make it into the vocabulary
    return tokenizer


def special_token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of a special token, by its string (use the `SPECIAL_TOKENS` fields).

    Unlike `convert_tokens_to_ids`, which silently maps an unknown string to None or the unk id, this raises.
    """
    if token not in tokenizer.all_special_tokens:
        raise KeyError(
            f"{token!r} is not a special token of this tokenizer; known special tokens: "
            f"{sorted(tokenizer.all_special_tokens)}"
        )
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise KeyError(f"special token {token!r} has no id of its own in this tokenizer's vocabulary")
    return token_id


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Every role of `SpecialTokens` mapped to its id in `tokenizer` (raises if one is missing)."""
    roles = SpecialTokens.__dataclass_fields__
    return {role: special_token_id(tokenizer, getattr(SPECIAL_TOKENS, role)) for role in roles}


def reject_special_tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """Raise if user text spells out a special token: it would be parsed as that token (an injected query
    placeholder or image marker silently changes the sequence layout)."""
    found = [tok for tok in tokenizer.all_special_tokens if tok in text]
    if found:
        raise ValueError(f"text contains special token(s) {found}: {text!r}")


# OpenAI CLIP's normalisation, which Qwen2.5-VL's image processor uses.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor.

    The stock class requires a video processor, whose base class needs torchvision (not a dependency); images
    and text behave exactly as in `Qwen2_5_VLProcessor` (image_pad expanded to one token per merged patch).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )


def build_processor(
    tokenizer: PreTrainedTokenizerFast,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    min_pixels: int,
    max_pixels: int,
) -> ImageTextProcessor:
    """A processor whose image side matches a vision tower: patches of `patch_size`, `merge_size`^2 patches
    merged per LM token; images are resized to a pixel count in [min_pixels, max_pixels] (multiples of
    patch_size * merge_size per side). A 64x64 image with patch 8 and merge 2 gives 8x8 patches -> 16 tokens."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return ImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def shapes_corpus(n_scenes: int, seed: int = 0) -> Iterator[str]:
    """ShapesWorld text for tokenizer training: captions, QA and prompts of `n_scenes` random scenes, the
    generation template around those captions, evaluation-style prompts and the chat turns."""
    from blip3o.world.language import annotate
    from blip3o.world.sampler import sample_scene

    rng = np.random.default_rng(seed)
    for _ in range(n_scenes):
        annotation = annotate(sample_scene(rng), rng)
        yield annotation.short_caption
        yield annotation.long_caption
        yield GENERATION_TEMPLATE.format(caption=annotation.short_caption)
        yield GENERATION_TEMPLATE.format(caption=annotation.long_caption)
        for qa in annotation.qa:
            yield qa.question
            yield qa.answer
        # The chat scaffold surrounds every training sequence, so it is weighted like the captions.
        yield from _chat_scaffold()
    yield from _evaluation_prompts()


def _chat_scaffold() -> Iterator[str]:
    t = SPECIAL_TOKENS
    yield f"{t.im_start}system\n{DEFAULT_SYSTEM_PROMPT}{t.im_end}\n{t.im_start}user\n"
    yield f"{t.im_end}\n{t.im_start}assistant\n"


def _evaluation_prompts() -> Iterator[str]:
    """The `prompt` field of every packaged GenEval-style prompt file (JSON lines, world/data/*.jsonl):
    the "a photo of ..." wording the evaluation feeds the generator."""
    data = resources.files("blip3o.world") / "data"
    if not data.is_dir():
        return
    for path in sorted(data.iterdir(), key=lambda p: p.name):
        if path.name.endswith(".jsonl"):
            for line in path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)["prompt"]
