"""Tests for blip3o.models.clip: the CLIP target encoder (contrastive loss, pooled normalised patch tokens)."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from blip3o.data.tokenizer import shapes_corpus, train_tokenizer
from blip3o.models.clip import (
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_STD,
    ClipConfig,
    ClipEncoder,
    clip_config,
    grid_to_tokens,
    pool_tokens,
    same_caption_matrix,
    tokens_to_grid,
)
from blip3o.world.language import annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene

# These models are tiny: on a shared 2-core machine a second intra-op thread mostly waits for a core
# (measured: a decoder step took 0.2 s on one thread, 2-6 s on two under load). Fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shapes_corpus(40, seed=0), vocab_size=512)


@pytest.fixture(scope="module")
def shapes_batch():
    """16 ShapesWorld renders and their annotations."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(16)]
    return [render(s) for s in scenes], [annotate(s, rng) for s in scenes]


def make_encoder(seed: int = 0, **overrides) -> ClipEncoder:
    torch.manual_seed(seed)
    return ClipEncoder(clip_config("tiny", **overrides))


def test_presets_and_derived_sizes():
    tiny = clip_config("tiny")
    assert (tiny.patch_grid, tiny.target_grid, tiny.num_target_tokens, tiny.feature_dim) == (8, 8, 64, 128)
    pooled = clip_config("tiny_pool2")
    assert (pooled.target_grid, pooled.num_target_tokens) == (4, 16)
    # The release: 448 px / patch 14 = 32x32 patches, pooled 4x4 to 8x8 = 64 tokens of 1792 channels.
    eva = clip_config("eva_clip_e_14_plus")
    assert (eva.patch_grid, eva.target_grid, eva.num_target_tokens, eva.feature_dim) == (32, 8, 64, 1792)
    hf = eva.to_hf_config()  # a config only: building this model would take ~17 GB
    assert (hf.vision_config.hidden_size, hf.vision_config.num_hidden_layers) == (1792, 64)
    assert (hf.vision_config.image_size, hf.vision_config.patch_size) == (448, 14)
    with pytest.raises(ValueError, match="target_pool"):
        ClipConfig(target_pool=3)
    with pytest.raises(KeyError, match="unknown CLIP preset"):
        clip_config("huge")


def test_grid_layout_is_row_major_and_round_trips():
    tokens = torch.randn(2, 12, 5)[:, :9]  # (B, 9, D): a 3x3 grid
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 5, 3, 3)
    # Token r * w + c sits at row r, column c, channels first.
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 * 3 + 2])
    assert torch.equal(grid_to_tokens(grid), tokens)
    with pytest.raises(ValueError, match="square"):
        tokens_to_grid(torch.zeros(1, 8, 4))


def test_pool_factor_two_on_a_known_tensor():
    # A 4x4 grid whose single channel holds the token index 0..15 (row-major), second channel its negation.
    index = torch.arange(16, dtype=torch.float32)
    tokens = torch.stack([index, -index], dim=-1)[None]  # (1, 16, 2)
    pooled = pool_tokens(tokens, 2)  # (1, 4, 2)
    # Quadrants: top-left {0, 1, 4, 5}, top-right {2, 3, 6, 7}, bottom-left {8, 9, 12, 13}, bottom-right.
    expected = torch.tensor([2.5, 4.5, 10.5, 12.5])
    assert pooled.shape == (1, 4, 2)
    assert torch.allclose(pooled[0, :, 0], expected)
    assert torch.allclose(pooled[0, :, 1], -expected)
    assert pool_tokens(tokens, 1) is tokens


def test_preprocess_applies_clip_normalisation_and_resizes():
    encoder = make_encoder()
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    wide = Image.new("RGB", (128, 96), (0, 0, 0))  # resized (shorter side) and centre-cropped
    batch = encoder.preprocess([white, wide])
    assert batch.shape == (2, 3, 64, 64)
    mean, std = torch.tensor(CLIP_PIXEL_MEAN), torch.tensor(CLIP_PIXEL_STD)
    assert torch.allclose(batch[0, :, 10, 10], (1 - mean) / std)
    assert torch.allclose(batch[1, :, 10, 10], -mean / std)


def test_encode_image_is_pooled_last_layer_patch_tokens(shapes_batch):
    images, _ = shapes_batch
    encoder = make_encoder().eval()
    pixels = encoder.preprocess(images[:4])
    with torch.no_grad():
        raw = encoder.encode_image_raw(pixels)
        hidden = encoder.clip.vision_model(pixel_values=pixels).last_hidden_state  # (4, 65, 128)
        # Same towers, pooled 2x2: must equal pooling the unpooled tokens.
        pooled_encoder = ClipEncoder(clip_config("tiny_pool2"), clip=encoder.clip).eval()
        pooled = pooled_encoder.encode_image_raw(pixels)
    assert raw.shape == (4, 64, 128)
    assert torch.equal(raw, hidden[:, 1:])  # CLS dropped, no post_layernorm
    assert pooled.shape == (4, 16, 128)
    assert torch.allclose(pooled, pool_tokens(raw, 2), atol=1e-6)


def test_feature_normalisation_fit_and_round_trip():
    encoder = make_encoder()
    with pytest.raises(RuntimeError, match="not fitted"):
        encoder.encode_image(torch.zeros(1, 3, 64, 64))
    raw = torch.randn(50, 64, 128) * torch.linspace(0.1, 5, 128) + torch.linspace(-3, 3, 128)
    encoder.fit_feature_normalization(raw)
    assert encoder.feature_normalization_fitted
    normalised = encoder.normalize_features(raw).reshape(-1, 128)
    assert torch.allclose(normalised.mean(0), torch.zeros(128), atol=1e-4)
    assert torch.allclose(normalised.std(0), torch.ones(128), atol=1e-4)
    assert torch.allclose(encoder.denormalize_features(encoder.normalize_features(raw)), raw, atol=1e-5)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = (encoder.encode_image_raw(pixels) - encoder.feature_mean) / encoder.feature_std
        assert torch.allclose(encoder.encode_image(pixels), expected)


def _low_rank_raw(rank: int, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4, 128) raw features whose normalised tokens lie (up to tiny noise) in a `rank`-dim subspace with
    distinct variances, and the noise-free latent scales, largest first."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(4.0, 1.0, rank)  # (rank,)
    mixing = torch.linalg.qr(torch.randn(128, rank, generator=gen))[0]  # (128, rank), orthonormal columns
    latent = torch.randn(n * 4, rank, generator=gen) * scales  # (4n, rank)
    tokens = latent @ mixing.T + 1e-4 * torch.randn(n * 4, 128, generator=gen)  # (4n, 128)
    return tokens.reshape(n, 4, 128) * 3.0 + 1.5, scales


def test_target_components_are_whitened_top_principal_components():
    with pytest.raises(ValueError, match="target_components"):
        clip_config("tiny", target_components=129)
    raw, _ = _low_rank_raw(rank=6)
    encoder = make_encoder(target_components=4)
    assert encoder.config.target_channels == 4 and make_encoder().config.target_channels == 128
    with pytest.raises(RuntimeError, match="not fitted"):
        encoder.features_to_target(torch.zeros(1, 4, 128))
    encoder.fit_feature_normalization(raw)
    basis = encoder.component_basis  # (128, 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)  # orthonormal directions
    assert torch.all(encoder.component_std[:-1] > encoder.component_std[1:])  # by decreasing variance
    features = encoder.normalize_features(raw)  # (n, 4, 128)
    target = encoder.features_to_target(features).reshape(-1, 4)  # (4n, 4)
    assert torch.allclose(torch.cov(target.T), torch.eye(4), atol=1e-3)  # whitened and uncorrelated
    # The kept components are the best rank-4 summary: what is lost is exactly the two smallest variances.
    back = encoder.target_to_features(encoder.features_to_target(features))
    lost = (features - back).pow(2).sum(-1).mean()
    flat = features.reshape(-1, 128).double()
    variances = torch.linalg.eigvalsh(flat.T @ flat / (flat.shape[0] - 1)).flip(0)
    assert torch.isclose(lost.double(), variances[4:].sum(), rtol=1e-3)
    # A refit on the same data gives the same basis (signs fixed), so a resumed run keeps its target.
    again = make_encoder(seed=1, target_components=4)
    again.fit_feature_normalization(raw)
    assert torch.allclose(again.component_basis, basis, atol=1e-5)
    # The same target on another encoder's towers, without retraining: shares the towers, same fit.
    plain = make_encoder()
    tried = plain.with_target_components(4, raw)
    assert tried.clip is plain.clip and tried.config.target_components == 4
    assert torch.allclose(tried.component_basis, basis, atol=1e-5)
    assert torch.equal(tried.feature_mean, encoder.feature_mean)


def test_all_components_round_trip_exactly_and_zero_components_is_the_identity():
    raw, _ = _low_rank_raw(rank=128, n=100)
    full = make_encoder(target_components=128)
    full.fit_feature_normalization(raw)
    features = full.normalize_features(raw)
    assert torch.allclose(full.target_to_features(full.features_to_target(features)), features, atol=1e-3)
    plain = make_encoder()
    plain.fit_feature_normalization(raw)
    assert plain.features_to_target(features) is features and plain.target_to_features(features) is features


def test_target_components_are_saved_and_required_on_load(tmp_path):
    raw, _ = _low_rank_raw(rank=6, n=50)
    encoder = make_encoder(target_components=4)
    encoder.fit_feature_normalization(raw)
    encoder.save_pretrained(tmp_path / "k4")
    loaded = ClipEncoder.from_pretrained(tmp_path / "k4")
    assert torch.equal(loaded.component_basis, encoder.component_basis)
    assert torch.equal(loaded.component_std, encoder.component_std)
    # A folder fitted without components cannot silently load under a config that needs them.
    plain = make_encoder()
    plain.fit_feature_normalization(raw)
    plain.save_pretrained(tmp_path / "plain")
    config_file = tmp_path / "plain" / "config.json"
    config_file.write_text(
        config_file.read_text().replace('"target_components": 0', '"target_components": 4')
    )
    with pytest.raises(ValueError, match="component_basis"):
        ClipEncoder.from_pretrained(tmp_path / "plain")


def test_same_caption_matrix_compares_attended_tokens_only():
    pad = 0
    ids = torch.tensor([[5, 6, 7, pad], [5, 6, 7, 99], [5, 6, pad, pad], [8, 6, 7, pad]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    same = same_caption_matrix(ids, mask)
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )  # row 1 differs only under the padding
    assert torch.equal(same, expected)


def test_text_embedding_does_not_depend_on_padding_side(tokenizer):
    encoder = make_encoder().eval()
    captions = ["a red circle", "a blue square above a green star"]
    left = tokenizer(captions, padding=True, return_tensors="pt", padding_side="left")
    right = tokenizer(captions, padding=True, return_tensors="pt", padding_side="right")
    assert not torch.equal(left["attention_mask"], right["attention_mask"])
    with torch.no_grad():
        from_left = encoder.text_embeddings(left["input_ids"], left["attention_mask"])
        from_right = encoder.text_embeddings(right["input_ids"], right["attention_mask"])
    assert torch.allclose(from_left, from_right, atol=1e-5)


def test_contrastive_loss_is_clip_loss_for_unique_captions_and_multi_positive_otherwise(tokenizer):
    encoder = make_encoder().eval()
    pixels = torch.randn(4, 3, 64, 64)
    unique = tokenizer(["a red circle", "a blue star", "a green cross", "a pink square"], padding=True)
    ids, mask = torch.tensor(unique["input_ids"]), torch.tensor(unique["attention_mask"])
    with torch.no_grad():
        logits = encoder.similarity(pixels, ids, mask)
        assert torch.allclose(
            encoder.contrastive_loss(pixels, ids, mask), image_text_contrastive_loss(logits.T)
        )

        # Captions 0 and 2 are identical: each of those images has two correct texts and vice versa.
        dup = tokenizer(["a red circle", "a blue star", "a red circle", "a pink square"], padding=True)
        ids, mask = torch.tensor(dup["input_ids"]), torch.tensor(dup["attention_mask"])
        logits = encoder.similarity(pixels, ids, mask)
        targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
        log_p_text = logits.log_softmax(dim=1)  # (image, text)
        log_p_image = logits.T.log_softmax(dim=1)  # (text, image)
        expected = (-(targets * log_p_text).sum(1).mean() - (targets * log_p_image).sum(1).mean()) / 2
        loss = encoder.contrastive_loss(pixels, ids, mask)
        assert torch.allclose(loss, expected, atol=1e-6)
        # The duplicated texts embed identically, and then the two losses coincide in value: each image's two
        # true texts have equal probability, and the two identical text rows split the same two images. (An
        # earlier strict `<` here held only by float rounding and failed on another CPU.)
        assert torch.allclose(logits[:, 0], logits[:, 2])
        assert torch.allclose(loss, image_text_contrastive_loss(logits.T), atol=1e-5)

        # All captions identical: every image matches every text, so image->text is exactly log(B).
        same = tokenizer(["a red circle"] * 4, padding=True, return_tensors="pt")
        logits = encoder.similarity(pixels, same["input_ids"], same["attention_mask"])
        uniform = torch.full((4, 4), 0.25)
        assert torch.allclose(
            torch.nn.functional.cross_entropy(logits, uniform), torch.log(torch.tensor(4.0))
        )


def test_contrastive_loss_decreases_on_shapesworld_renders(tokenizer, shapes_batch):
    images, annotations = shapes_batch
    encoder = make_encoder(text_vocab_size=len(tokenizer))
    pixels = encoder.preprocess(images)
    # Short captions: ten steps from scratch move the loss on them. Long ones need a short real run (measured,
    # batch 64 from 2,048 scenes, lr 5e-4 with warmup: 4.50 at step 0, 3.14 at step 45, ~0.9 at step 150).
    text = tokenizer([a.short_caption for a in annotations], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-4)
    losses = []
    for _ in range(10):
        loss = encoder.contrastive_loss(pixels, text["input_ids"], text["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.2, losses


def test_save_load_round_trip(tmp_path, shapes_batch):
    images, _ = shapes_batch
    encoder = make_encoder(target_pool=2).eval()
    pixels = encoder.preprocess(images[:4])
    with torch.no_grad():
        encoder.fit_feature_normalization(encoder.encode_image_raw(pixels))
        ids = torch.randint(3, 512, (4, 10))
        mask = torch.ones_like(ids)
        expected_features = encoder.encode_image(pixels)
        expected_loss = encoder.contrastive_loss(pixels, ids, mask)
    encoder.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "clip", "feature_stats.safetensors"}
    loaded = ClipEncoder.from_pretrained(tmp_path)
    assert asdict(loaded.config) == asdict(encoder.config)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), expected_features)
        assert torch.equal(loaded.contrastive_loss(pixels, ids, mask), expected_loss)
    assert int(loaded.feature_count) == 4 * 16


def test_config_round_trips_through_dict():
    config = replace(clip_config("tiny"), target_pool=2, text_vocab_size=300)
    assert ClipConfig.from_dict(asdict(config)) == config
    with pytest.raises(ValueError, match="unknown ClipConfig fields"):
        ClipConfig.from_dict({**asdict(config), "colour": 1})


def test_hard_negatives_join_image_to_text_columns_only(tokenizer):
    encoder = make_encoder().eval()
    pixels = torch.randn(3, 3, 64, 64)
    pos = tokenizer(["a red circle", "a blue star", "a green cross"], padding=True, return_tensors="pt")
    # Row 0's negative is new text; row 1's negative equals row 0's caption (a positive for row 0 only).
    neg = tokenizer(["a red star", "a red circle", "a green square"], padding=True, return_tensors="pt")
    ids, mask = pos["input_ids"], pos["attention_mask"]
    with torch.no_grad():
        logits = encoder.similarity(pixels, ids, mask)  # (3, 3)
        neg_logits = encoder.similarity(pixels, neg["input_ids"], neg["attention_mask"])  # (3, 3)
        all_logits = torch.cat([logits, neg_logits], dim=1)  # (3, 6)
        targets = torch.tensor([[0.5, 0, 0, 0, 0.5, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
        image_to_text = -(targets * all_logits.log_softmax(dim=1)).sum(1).mean()
        text_to_image = torch.nn.functional.cross_entropy(logits.T, torch.eye(3))
        expected = (image_to_text + text_to_image) / 2
        loss = encoder.contrastive_loss(pixels, ids, mask, neg["input_ids"], neg["attention_mask"])
        assert torch.allclose(loss, expected, atol=1e-6)
        # Extra negatives can only make the image->text task harder.
        assert loss > encoder.contrastive_loss(pixels, ids, mask)
        with pytest.raises(ValueError, match="negative_mask"):
            encoder.contrastive_loss(pixels, ids, mask, neg["input_ids"], None)


def test_pixel_head_adds_reconstruction_loss_and_round_trips(tmp_path, tokenizer, shapes_batch):
    images, annotations = shapes_batch
    plain = make_encoder(text_vocab_size=len(tokenizer)).eval()
    encoder = make_encoder(text_vocab_size=len(tokenizer), reconstruction_weight=2.0).eval()
    assert plain.pixel_head is None and encoder.pixel_head is not None
    with pytest.raises(ValueError, match="no pixel head"):
        plain.reconstruct_pixels(plain.preprocess(images[:1]))
    pixels = encoder.preprocess(images[:4])  # (4, 3, 64, 64)
    text = tokenizer([a.short_caption for a in annotations[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        recon = encoder.reconstruct_pixels(pixels)
        assert recon.shape == pixels.shape
        # Same towers (same seed), so the difference is exactly weight x MSE of the head's patches.
        plain.load_state_dict(
            {k: v for k, v in encoder.state_dict().items() if not k.startswith("pixel_head")}
        )
        extra = encoder.contrastive_loss(
            pixels, text["input_ids"], text["attention_mask"]
        ) - plain.contrastive_loss(pixels, text["input_ids"], text["attention_mask"])
        assert torch.allclose(extra, 2.0 * torch.nn.functional.mse_loss(recon, pixels), atol=1e-5)
        encoder.fit_feature_normalization(encoder.encode_image_raw(pixels))
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "pixel_head.safetensors").exists()
    loaded = ClipEncoder.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct_pixels(pixels), recon)


def test_pixel_head_learns_to_redraw_patches(shapes_batch):
    """A few steps on the auxiliary loss alone bring the head's reconstruction closer to the image."""
    images, _ = shapes_batch
    encoder = make_encoder(reconstruction_weight=1.0)
    pixels = encoder.preprocess(images)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    errors = []
    for _ in range(15):
        hidden = encoder.clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, 64, D)
        loss = encoder._reconstruction_loss(hidden, pixels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        errors.append(loss.item())
    assert errors[-1] < 0.5 * errors[0], errors


def test_label_head_adds_its_loss_reads_tokens_and_round_trips(tmp_path, tokenizer, shapes_batch):
    images, annotations = shapes_batch
    labelled = dict(patch_label_weight=0.5, patch_label_groups=(3, 2), patch_label_values=2)
    plain = make_encoder(text_vocab_size=len(tokenizer)).eval()
    encoder = make_encoder(text_vocab_size=len(tokenizer), **labelled).eval()
    assert plain.label_head is None and encoder.label_head.out_features == 7
    pixels = encoder.preprocess(images[:4])  # (4, 3, 64, 64)
    text = tokenizer([a.short_caption for a in annotations[:4]], padding=True, return_tensors="pt")
    ids, mask = text["input_ids"], text["attention_mask"]
    g = torch.Generator().manual_seed(0)
    labels = torch.cat(
        [
            torch.rand(4, 64, 3, generator=g).softmax(-1),
            torch.rand(4, 64, 2, generator=g).softmax(-1),
            torch.rand(4, 64, 2, generator=g),
        ],
        dim=-1,
    )  # (4, 64, 7)
    with pytest.raises(ValueError, match="patch_labels of shape"):
        encoder.contrastive_loss(pixels, ids, mask)
    with pytest.raises(ValueError, match="patch_labels of shape"):
        encoder.contrastive_loss(pixels, ids, mask, patch_labels=labels[..., :6])
    plain.load_state_dict({k: v for k, v in encoder.state_dict().items() if not k.startswith("label_head")})
    with torch.no_grad():
        extra = encoder.contrastive_loss(pixels, ids, mask, patch_labels=labels) - plain.contrastive_loss(
            pixels, ids, mask
        )
        patches = encoder.clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]  # (4, 64, 128)
        out = encoder.label_head(patches)  # (4, 64, 7)
        expected = (
            -(labels[..., :3] * out[..., :3].log_softmax(-1)).sum(-1).mean()
            - (labels[..., 3:5] * out[..., 3:5].log_softmax(-1)).sum(-1).mean()
            + torch.nn.functional.mse_loss(out[..., 5:], labels[..., 5:])
        )
        assert torch.allclose(extra, 0.5 * expected, atol=1e-5)
        read = encoder.patch_labels_from_tokens(patches)  # (4, 64, 7)
        assert torch.allclose(read[..., :3].sum(-1), torch.ones(4, 64))
        assert torch.allclose(read[..., 3:5].sum(-1), torch.ones(4, 64))
        assert torch.equal(read[..., 5:], out[..., 5:])
        encoder.fit_feature_normalization(encoder.encode_image_raw(pixels))
    with pytest.raises(ValueError, match="no patch-label head"):
        plain.patch_labels_from_tokens(patches)
    encoder.save_pretrained(tmp_path)
    loaded = ClipEncoder.from_pretrained(tmp_path)
    assert loaded.config == encoder.config  # the groups come back as a tuple from JSON
    with torch.no_grad():
        assert torch.equal(loaded.patch_labels_from_tokens(patches), read)


def test_label_basis_target_is_what_the_label_head_reads(tmp_path):
    """target_basis "labels": the DiT's target spans exactly the head's reading (its output is an affine function
    of the target), each channel has unit variance, and the fit survives save/load."""
    labelled = dict(patch_label_weight=1.0, patch_label_groups=(3, 2), patch_label_values=2)
    with pytest.raises(ValueError, match="target_basis 'labels' needs"):
        make_encoder(target_basis="labels", target_components=7)  # no label head
    with pytest.raises(ValueError, match="target_basis 'labels' needs"):
        make_encoder(target_basis="labels", target_components=6, **labelled)
    with pytest.raises(ValueError, match="target_basis must be"):
        make_encoder(target_basis="random")
    encoder = make_encoder(target_basis="labels", target_components=7, **labelled)
    raw, _ = _low_rank_raw(rank=40, n=200)  # (200, 4, 128)
    encoder.fit_feature_normalization(raw)
    target = encoder.features_to_target(encoder.normalize_features(raw)).reshape(-1, 7).double()  # (800, 7)
    assert torch.allclose(target.var(0), torch.ones(7, dtype=torch.float64), atol=1e-3)
    with torch.no_grad():
        read = encoder.label_head(raw).reshape(-1, 7).double()  # (800, 7): logits and values
    design = torch.cat([target, torch.ones(len(target), 1, dtype=torch.float64)], dim=1)  # (800, 8)
    fitted = design @ torch.linalg.lstsq(design, read).solution
    assert torch.allclose(fitted, read, atol=1e-4 * read.abs().max())
    # Mapped back to features, the target keeps the head's reading and nothing else is needed for it.
    back = encoder.denormalize_features(
        encoder.target_to_features(encoder.features_to_target(encoder.normalize_features(raw)))
    )
    with torch.no_grad():
        assert torch.allclose(encoder.label_head(back), encoder.label_head(raw), atol=1e-3)
    encoder.save_pretrained(tmp_path)
    loaded = ClipEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.component_basis, encoder.component_basis)


def test_balanced_label_loss_weighs_object_and_empty_patches_equally(tokenizer, shapes_batch):
    """patch_label_balanced: the per-patch loss (cross-entropy per group + mean squared value error) averaged over
    the patches whose first group says something other than "none", plus its average over the empty ones."""
    images, _ = shapes_batch
    labelled = dict(patch_label_weight=2.0, patch_label_groups=(3, 2), patch_label_values=2)
    plain = make_encoder(text_vocab_size=len(tokenizer), **labelled).eval()
    balanced = make_encoder(text_vocab_size=len(tokenizer), patch_label_balanced=True, **labelled).eval()
    balanced.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    holds = torch.rand(4, 64, generator=g) < 0.1  # (4, 64): about 6 object patches per image
    first = torch.zeros(4, 64, 3)
    first[..., 2] = 1.0  # "none"
    first[holds] = torch.tensor([0.7, 0.3, 0.0])
    labels = torch.cat(
        [first, torch.rand(4, 64, 2, generator=g).softmax(-1), torch.rand(4, 64, 2, generator=g)], -1
    )
    pixels = plain.preprocess(images[:4])  # (4, 3, 64, 64)
    with torch.no_grad():
        patches = plain.clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]  # (4, 64, 128)
        out = plain.label_head(patches)  # (4, 64, 7)
        per_patch = (
            -(labels[..., :3] * out[..., :3].log_softmax(-1)).sum(-1)
            - (labels[..., 3:5] * out[..., 3:5].log_softmax(-1)).sum(-1)
            + (out[..., 5:] - labels[..., 5:]).pow(2).mean(-1)
        )  # (4, 64)
        assert torch.allclose(plain._patch_label_loss(patches, labels), 2.0 * per_patch.mean(), atol=1e-5)
        expected = 2.0 * (per_patch[holds].mean() + per_patch[~holds].mean())
        assert torch.allclose(balanced._patch_label_loss(patches, labels), expected, atol=1e-5)
        # A batch with no object at all: the empty side alone, no NaN.
        empty = labels.clone()
        empty[..., :3] = torch.tensor([0.0, 0.0, 1.0])
        alone = balanced._patch_label_loss(patches, empty)
        assert torch.isfinite(alone) and torch.allclose(
            alone, plain._patch_label_loss(patches, empty), atol=1e-5
        )
    with pytest.raises(ValueError, match="patch_label_balanced needs"):
        clip_config("tiny", patch_label_balanced=True)


def test_label_head_config_is_checked():
    with pytest.raises(ValueError, match="needs patch_label_groups"):
        clip_config("tiny", patch_label_weight=1.0)
    with pytest.raises(ValueError, match="class counts"):
        clip_config("tiny", patch_label_weight=1.0, patch_label_groups=(1,))
    with pytest.raises(ValueError, match=">= 0"):
        clip_config("tiny", patch_label_weight=-1.0)
