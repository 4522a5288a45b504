"""The tokenizer/processor and the Qwen2.5-VL backbone with BLIP3-o's learnable queries (tiny preset, CPU)."""

import copy
import dataclasses
import os

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from blip3o.data.tokenizer import (
    GENERATION_TEMPLATE,
    SPECIAL_TOKENS,
    reject_special_tokens,
    shapes_corpus,
    special_token_id,
    special_token_ids,
    train_tokenizer,
)
from blip3o.models.backbone import (
    Backbone,
    BackboneConfig,
    interleaved_mrope_order,
    vision_position_code,
)
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene

CAPTIONS = ["a red circle", "two blue squares left of a green star in the top right corner"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything here must work without the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def corpus():
    return list(shapes_corpus(n_scenes=200, seed=0))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="module")
def backbone(tokenizer):
    torch.manual_seed(0)
    return Backbone.from_config(BackboneConfig.preset("tiny"), tokenizer).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [render(sample_scene(rng)) for _ in range(2)]


# ---- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_has_named_special_tokens(tokenizer):
    ids = special_token_ids(tokenizer)
    assert set(ids) == set(SPECIAL_TOKENS.__dataclass_fields__)
    assert len(set(ids.values())) == len(ids)  # one id each
    assert len(tokenizer) == 512
    assert tokenizer.pad_token == SPECIAL_TOKENS.pad and tokenizer.eos_token == SPECIAL_TOKENS.im_end
    assert tokenizer.image_token == SPECIAL_TOKENS.image_pad  # what the Qwen2.5-VL processor reads
    assert tokenizer.padding_side == "left"
    for token, token_id in (
        (SPECIAL_TOKENS.image_start, ids["image_start"]),
        (SPECIAL_TOKENS.query, ids["query"]),
    ):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]


def test_tokenizer_round_trips_text_and_covers_the_world_vocabulary(tokenizer, corpus):
    for text in [*corpus[:200], *corpus[-50:], "Unseen wörds, digits 12345 and emoji 😀\n\ttabs"]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    # The world's words are frequent enough to be single tokens (after a space, as inside a sentence).
    for word in ["circle", "square", "triangle", "star", "cross", "red", "blue", "left", "above", "photo"]:
        assert len(tokenizer.tokenize(" " + word)) == 1, word
    assert any(text.startswith("a photo of") for text in corpus)  # the evaluation prompts are in the corpus


def test_tokenizer_saves_and_loads_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    text = GENERATION_TEMPLATE.format(caption=CAPTIONS[1])
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert special_token_ids(loaded) == special_token_ids(tokenizer)
    assert loaded.chat_template == tokenizer.chat_template and loaded.padding_side == "left"


def test_chat_template_is_chatml_with_default_system_prompt(tokenizer):
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(custom, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )


def test_special_token_misuse_is_a_clear_error(tokenizer, backbone):
    with pytest.raises(KeyError, match="not a special token"):
        special_token_id(tokenizer, "<image>")  # the release's placeholder name is not ours
    with pytest.raises(ValueError, match="special token"):
        reject_special_tokens(tokenizer, "a red <|query|> circle")
    with pytest.raises(ValueError, match="special token"):
        backbone.generation_inputs(["a circle [IMG]"])
    inputs = backbone.generation_inputs(CAPTIONS[:1])
    with pytest.raises(ValueError, match="last 64 tokens"):
        backbone.condition(inputs["input_ids"][:, :-1], inputs["attention_mask"][:, :-1])


# ---- backbone -----------------------------------------------------------------------------------------------


def test_generation_inputs_are_left_padded_with_queries_last(backbone):
    ids = backbone.token_ids
    batch = backbone.generation_inputs(CAPTIONS)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    assert input_ids.shape == mask.shape and input_ids.shape[0] == 2
    assert (input_ids[:, -64:] == ids["query"]).all() and (input_ids[:, -65] == ids["image_start"]).all()
    lengths = mask.sum(1)
    assert lengths[0] < lengths[1] and lengths[1] == input_ids.shape[1]
    n_pad = int(input_ids.shape[1] - lengths[0])
    assert (input_ids[0, :n_pad] == ids["pad"]).all() and (mask[0, :n_pad] == 0).all()
    assert input_ids[0, n_pad] == ids["im_start"]
    prompt = backbone.processor.tokenizer.decode(input_ids[0, n_pad:-65])
    assert prompt.endswith(
        f"{GENERATION_TEMPLATE.format(caption=CAPTIONS[0])}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_condition_shape_depends_on_caption_and_is_pad_invariant(backbone):
    with torch.no_grad():
        both = backbone.condition(**backbone.generation_inputs(CAPTIONS))
        alone = [backbone.condition(**backbone.generation_inputs([c]))[0] for c in CAPTIONS]
    assert both.shape == (2, 64, 128) and torch.isfinite(both).all()
    # Row 0 is left-padded in the batch and unpadded alone: same positions, same condition.
    torch.testing.assert_close(both[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1], alone[1], rtol=0, atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-3  # the caption matters
    assert (both[0, 0] - both[0, 1]).abs().max() > 1e-3  # and each query position is its own output


def test_condition_word_tokens_are_the_last_prompt_embeddings_before_the_query_states(backbone, tmp_path):
    short = "a star"
    batch = backbone.generation_inputs([short, CAPTIONS[1]])
    ids, mask = batch["input_ids"][:, :-64], batch["attention_mask"][:, :-64]  # (2, T), row 0 left-padded
    real = int(mask[0].sum())  # the short prompt's own tokens
    words = real + 3  # more than the short prompt has, fewer than the long one
    assert words < ids.shape[1]
    config = dataclasses.replace(backbone.config, condition_word_tokens=words)
    worded = Backbone(config, backbone.processor, backbone.vlm).eval()
    worded.latent_queries.data.copy_(backbone.latent_queries)
    embed = backbone.vlm.model.language_model.embed_tokens
    with torch.no_grad():
        condition = worded.condition(**batch)  # (2, words + 64, H)
        plain = backbone.condition(**batch)  # (2, 64, H)
        alone = worded.condition(**worded.generation_inputs([short]))[0]
        torch.testing.assert_close(condition[1, :words], embed(ids[1, -words:]), rtol=0, atol=0)  # unpadded
        torch.testing.assert_close(condition[0, 3:words], embed(ids[0, -real:]), rtol=0, atol=0)
    assert condition.shape == (2, words + 64, 128)
    torch.testing.assert_close(condition[:, words:], plain, rtol=0, atol=0)  # the query states are unchanged
    assert condition[0, :3].abs().max() == 0  # positions the short prompt lacks are zero word tokens
    torch.testing.assert_close(alone, condition[0], rtol=0, atol=1e-5)  # the same prompt alone: same tokens
    # Unlike the query states, the words are not computed from each other: "left" vs "right" changes one.
    with torch.no_grad():
        left, right = (worded.condition(**worded.generation_inputs([f"a circle {w} of a star"]))[0, :words]
                       for w in ("left", "right"))  # fmt: skip
    assert int((left - right).abs().amax(-1).gt(0).sum()) == 1
    assert backbone.condition_words(**batch).shape == (2, 0, 128)  # none configured: none given
    worded.save_pretrained(tmp_path)
    assert Backbone.from_pretrained(tmp_path).config.condition_word_tokens == words
    with pytest.raises(ValueError, match="condition_word_tokens"):
        dataclasses.replace(backbone.config, condition_word_tokens=-1)


def test_frozen_language_model_passes_gradients_to_queries_only(backbone):
    model = copy.deepcopy(backbone)
    model.freeze_language_model()
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["latent_queries"]
    batch = model.generation_inputs(CAPTIONS)
    with torch.no_grad():
        no_grad = model.condition(**batch)
    assert not no_grad.requires_grad
    condition = model.condition(**batch)
    torch.testing.assert_close(condition, no_grad, rtol=0, atol=0)
    condition.pow(2).mean().backward()
    assert model.latent_queries.grad is not None and model.latent_queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vlm.parameters())


def test_understanding_labels_cover_only_the_answer(backbone, images):
    tokenizer = backbone.processor.tokenizer
    batch = backbone.understanding_inputs(
        images, ["What is in the image?", "Describe."], ["a red circle", "stars"]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]  # 64 px / 8 px patches
    assert batch["pixel_values"].shape == (2 * 64, 3 * 2 * 8 * 8)
    assert (batch["mm_token_type_ids"].sum(1) == 16).all()  # 8x8 patches merged 2x2 -> 16 tokens an image
    for row, answer in zip(batch["labels"], ["a red circle", "stars"], strict=True):
        assert tokenizer.decode(row[row != -100]) == answer + SPECIAL_TOKENS.im_end
        assert (row[-1] != -100) and (row[row != -100].numel() == (row != -100).sum())


def test_understanding_conversation_is_the_chat_template_with_every_answer_labelled(backbone, images):
    import re

    tokenizer = backbone.processor.tokenizer
    questions, answers = ["what colour is it?", "how many?", "is it big?"], ["red", "two", "no"]
    batch = backbone.understanding_inputs(images[:1], [questions], [answers])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tokenizer.decode(ids))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0]}]}]
    messages.append({"role": "assistant", "content": answers[0]})
    for question, answer in zip(questions[1:], answers[1:], strict=True):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert text == tokenizer.apply_chat_template(messages, tokenize=False).removesuffix("\n")
    end = SPECIAL_TOKENS.im_end
    assert tokenizer.decode(labels[labels != -100]) == "".join(a + end for a in answers)
    assert (batch["mm_token_type_ids"].sum(1) == 16).all()
    # A one-turn conversation is the plain prompt/answer sample, token for token.
    one = backbone.understanding_inputs(images, [[questions[0]], "Describe."], [[answers[0]], "stars"])
    plain = backbone.understanding_inputs(images, [questions[0], "Describe."], [answers[0], "stars"])
    assert all(torch.equal(one[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="as many answers as questions"):
        backbone.understanding_inputs(images[:1], [questions], [answers[:2]])
    with pytest.raises(ValueError, match="special token"):
        backbone.understanding_inputs(images[:1], [["hi", "a <|im_start|> b"]], [["x", "y"]])


def test_understanding_loss_decreases_and_understand_is_batch_invariant(backbone, images):
    model = copy.deepcopy(backbone).train()
    prompts, answers = ["What is in the image?"] * 2, ["a red square", "a green star"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.understanding_loss(images, prompts, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(512), abs=0.5)  # uniform over the vocabulary at init
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    answers_out = model.understand(images, prompts, max_new_tokens=6)
    assert len(answers_out) == 2 and all(isinstance(a, str) and a for a in answers_out)
    assert model.understand(images[1:], prompts[1:], max_new_tokens=6) == answers_out[1:]


def test_understanding_loss_sample_average_weighs_each_sample_equally(backbone, images):
    model = copy.deepcopy(backbone).eval()
    prompts = ["Describe.", "What colour is it?"]
    answers = ["a red square above a green star and a blue circle left of a black cross", "red"]
    with torch.no_grad():
        alone = [
            model.understanding_loss(images[i : i + 1], prompts[i : i + 1], answers[i : i + 1])
            for i in (0, 1)
        ]
        by_token = model.understanding_loss(images, prompts, answers, average="token")
        by_sample = model.understanding_loss(images, prompts, answers, average="sample")
    assert by_sample.item() == pytest.approx((alone[0].item() + alone[1].item()) / 2, rel=1e-4)
    # Token averaging weighs the long caption by its length, so the two differ on unequal answers.
    n = [len(model.processor.tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in answers]
    expected_token = (alone[0].item() * n[0] + alone[1].item() * n[1]) / sum(n)
    assert by_token.item() == pytest.approx(expected_token, rel=1e-4)
    assert abs(by_token.item() - by_sample.item()) > 1e-3
    with pytest.raises(ValueError, match="average"):
        model.understanding_loss(images, prompts, answers, average="batch")


def test_save_load_round_trip_gives_identical_outputs(backbone, images, tmp_path):
    backbone.save_pretrained(tmp_path)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "processor_config.json"]:
        assert (tmp_path / name).is_file(), name
    loaded = Backbone.from_pretrained(tmp_path).eval()
    assert loaded.config == backbone.config and loaded.token_ids == backbone.token_ids
    assert loaded.processor.image_processor.patch_size == 8
    torch.testing.assert_close(loaded.latent_queries, backbone.latent_queries, rtol=0, atol=0)
    batch = backbone.generation_inputs(CAPTIONS)
    prompts, answers = ["Describe."] * 2, ["a red circle", "a star"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.condition(**batch), backbone.condition(**batch), rtol=0, atol=0)
        torch.testing.assert_close(
            loaded.understanding_loss(images, prompts, answers),
            backbone.understanding_loss(images, prompts, answers),
            rtol=0,
            atol=0,
        )
    # model.safetensors is a plain Qwen2.5-VL checkpoint.
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(
    ("preset", "published"),
    [("qwen2.5-vl-3b", 3_754_622_976), ("qwen2.5-vl-7b", 8_292_166_656)],  # Hub safetensors totals
)
def test_released_presets_build_on_meta_with_published_sizes(preset, published):
    with torch.device("meta"):
        model = Backbone(BackboneConfig.preset(preset))
    n_vlm = sum(p.numel() for p in model.vlm.parameters())
    print(
        f"{preset}: {n_vlm:,} VLM parameters (published {published:,}), queries {tuple(model.latent_queries.shape)}"
    )
    assert abs(n_vlm - published) / published < 1e-3
    assert model.latent_queries.shape == (1, 64, model.config.hidden_size)


def test_tiny_preset_sizes(backbone):
    vision = sum(p.numel() for p in backbone.vlm.model.visual.parameters())
    total = sum(p.numel() for p in backbone.parameters())
    print(f"tiny: {total:,} parameters, vision tower {vision:,}")
    assert backbone.config.hidden_size == 128 and backbone.latent_queries.shape == (1, 64, 128)
    assert total < 2_000_000
    # Queries start on the scale of the token embeddings (query_init_std=None), not N(0, 1).
    assert backbone.latent_queries.std().item() == pytest.approx(0.02, rel=0.2)


def test_vision_position_code_tells_every_cell_apart_at_the_asked_scale():
    code = vision_position_code(torch.tensor([[1, 8, 8], [1, 4, 6]]), dim=129, merge=2, scale=1.5)
    assert code.shape == (16 + 6, 129)
    assert code[:, -1].abs().max() == 0  # an odd width leaves the last channel uncoded
    first = code[:16]  # raster order of a 4 x 4 merged grid
    assert first[:, :128].pow(2).mean().sqrt().item() == pytest.approx(1.5, rel=1e-6)
    assert torch.cdist(first, first).add(torch.eye(16) * 1e9).min() > 0.5  # 16 distinct codes
    rows, cols = first[:, :64].reshape(4, 4, 64), first[:, 64:128].reshape(4, 4, 64)
    assert torch.equal(rows, rows[:, :1].expand_as(rows)) and torch.equal(cols, cols[:1].expand_as(cols))
    torch.testing.assert_close(code[16:19, 64:128], first[:3, 64:128])  # 2nd image: 2 x 3, same columns


def test_vision_position_code_is_added_to_the_tokens_and_survives_save_load(backbone, images, tmp_path):
    config = dataclasses.replace(backbone.config, vision_position_scale=1.0)
    coded = Backbone(config, backbone.processor, copy.deepcopy(backbone.vlm)).eval()
    coded.latent_queries.data.copy_(backbone.latent_queries)
    with torch.no_grad():
        added = coded.vision_tokens(images) - backbone.vision_tokens(images)  # (B, 16, H)
    code = vision_position_code(torch.tensor([[1, 8, 8]]), added.shape[-1], 2, 1.0)  # (16, H)
    torch.testing.assert_close(added, code.expand_as(added), rtol=0, atol=1e-5)
    coded.save_pretrained(tmp_path)
    loaded = Backbone.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_position_scale == 1.0
    prompts, answers = ["Describe."] * 2, ["a red circle", "a star"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision_tokens(images), coded.vision_tokens(images), rtol=0, atol=0)
        with_code = coded.understanding_loss(images, prompts, answers)
        torch.testing.assert_close(
            loaded.understanding_loss(images, prompts, answers), with_code, rtol=0, atol=0
        )
        assert (with_code - backbone.understanding_loss(images, prompts, answers)).abs() > 1e-4


def test_interleaved_mrope_order_deals_frequencies_to_the_bands_in_turn():
    assert interleaved_mrope_order((4, 6, 6)) == [0, 3, 6, 9, 1, 4, 7, 10, 12, 14, 2, 5, 8, 11, 13, 15]
    order = interleaved_mrope_order((16, 24, 24))  # the released sizes
    assert sorted(order) == list(range(64))
    assert order[16] == 1 and order[40] == 2  # height and width bands start at the 2nd and 3rd frequency


def _column_angle(backbone: Backbone) -> float:
    """Largest rotary angle between image tokens in the first and the last of 4 columns (same row)."""
    rotary = backbone.vlm.model.language_model.rotary_emb
    positions = torch.tensor([[[5, 5]], [[7, 7]], [[7, 10]]])  # (3 bands, B=1, T=2): t, h, w
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # (1, 2, head_dim) each
    half = sin.shape[-1] // 2
    turn = torch.atan2(sin[0, 1, :half], cos[0, 1, :half]) - torch.atan2(sin[0, 0, :half], cos[0, 0, :half])
    return torch.atan2(turn.sin(), turn.cos()).abs().max().item()  # wrapped to [-pi, pi]


def test_interleaved_mrope_lets_positions_tell_columns_apart_and_survives_save_load(
    backbone, images, tmp_path
):
    config = dataclasses.replace(backbone.config, mrope_interleaved=True)
    interleaved = Backbone(config, backbone.processor, copy.deepcopy(backbone.vlm)).eval()
    interleaved.latent_queries.data.copy_(backbone.latent_queries)
    # Chunked, the width band holds the lowest frequencies: columns 0 and 3 differ by < 1e-3 rad.
    assert _column_angle(backbone) < 1e-3
    assert _column_angle(interleaved) > 0.3
    interleaved.save_pretrained(tmp_path)
    loaded = Backbone.from_pretrained(tmp_path).eval()
    assert loaded.config.mrope_interleaved
    rotary, loaded_rotary = (b.vlm.model.language_model.rotary_emb for b in (interleaved, loaded))
    torch.testing.assert_close(loaded_rotary.inv_freq, rotary.inv_freq, rtol=0, atol=0)
    prompts, answers = ["Describe."] * 2, ["a red circle", "a star"]
    with torch.no_grad():
        loss = interleaved.understanding_loss(images, prompts, answers)
        torch.testing.assert_close(loaded.understanding_loss(images, prompts, answers), loss, rtol=0, atol=0)
        assert (loss - backbone.understanding_loss(images, prompts, answers)).abs() > 1e-4


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_buffers_are_rebuilt_after_a_meta_build(backbone, interleaved):
    config = dataclasses.replace(backbone.config, mrope_interleaved=interleaved)
    reference = Backbone(config, backbone.processor, copy.deepcopy(backbone.vlm))
    with torch.device("meta"):
        on_meta = Backbone(config, backbone.processor)
    on_meta.to_empty(device="cpu")
    rotary = {n: b for n, b in on_meta.named_buffers() if n.endswith("inv_freq")}
    assert len(rotary) == 4  # vision and text, each inv_freq and original_inv_freq
    for buffer in rotary.values():
        buffer.fill_(float("nan"))  # what to_empty may leave
    on_meta.reset_rotary()
    expected = dict(reference.named_buffers())
    for name, buffer in rotary.items():
        torch.testing.assert_close(buffer, expected[name], atol=0, rtol=0)
