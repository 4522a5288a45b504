"""Tests for blip3o.models.decoder (the pixel decoder) and blip3o.models.vae (the design-study VAE)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from blip3o.models.decoder import (
    PixelDecoder,
    PixelDecoderConfig,
    decoder_config,
    images_to_tensor,
    tensor_to_images,
)
from blip3o.models.vae import Vae, VaeConfig, vae_config
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene

# These models are tiny: on a shared 2-core machine a second intra-op thread mostly waits for a core
# (measured: a decoder step took 0.2 s on one thread, 2-6 s on two under load). Fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    """8 ShapesWorld renders as a (8, 3, 64, 64) tensor in [-1, 1]."""
    rng = np.random.default_rng(0)
    return images_to_tensor([render(sample_scene(rng)) for _ in range(8)])


def make_decoder(seed: int = 0, **overrides) -> PixelDecoder:
    # "micro" has the layout of "tiny" (the same block types, feature shape and 64x64 output) at a quarter of
    # the width, which keeps this file fast on a shared CPU.
    torch.manual_seed(seed)
    return PixelDecoder(decoder_config("micro", **overrides))


def features(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 64, 128, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_image_tensor_conversion_round_trips():
    rng = np.random.default_rng(1)
    pil = [render(sample_scene(rng)) for _ in range(2)]
    batch = images_to_tensor(pil)
    assert batch.shape == (2, 3, 64, 64)
    assert batch.min() >= -1 and batch.max() <= 1
    back = tensor_to_images(batch)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil, back, strict=True))


def test_loss_is_a_scalar_and_rejects_mismatched_features(images):
    decoder = make_decoder()
    loss = decoder.loss(images[:2], features(2, 0), seeded(0))
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ValueError, match=r"features must be \(B, 64, 128\)"):
        decoder.loss(images[:2], torch.zeros(2, 16, 128), seeded(0))


def test_feature_dropout_one_ignores_the_features(images):
    decoder = make_decoder(feature_dropout=1.0)
    with torch.no_grad():
        a = decoder.loss(images[:2], features(2, 0), seeded(0))
        b = decoder.loss(images[:2], features(2, 1), seeded(0))
    assert torch.equal(a, b)
    no_dropout = make_decoder(feature_dropout=0.0)
    with torch.no_grad():
        a = no_dropout.loss(images[:2], features(2, 0), seeded(0))
        b = no_dropout.loss(images[:2], features(2, 1), seeded(0))
    assert not torch.equal(a, b)


def test_loss_decreases_on_a_fixed_batch(images):
    decoder = make_decoder()
    cond = features(4, 0)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = decoder.loss(images[:4], cond, seeded(0))  # the same draws every step: the same objective
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_decode_range_and_determinism():
    decoder = make_decoder().eval()
    cond = features(2, 0)
    a = decoder.decode(cond, steps=3, cfg_scale=3.0, generator=seeded(0))
    b = decoder.decode(cond, steps=3, cfg_scale=3.0, generator=seeded(0))
    c = decoder.decode(cond, steps=3, cfg_scale=3.0, generator=seeded(1))
    assert a.shape == (2, 3, 64, 64)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cfg_runs_both_branches_in_one_unet_call():
    decoder = make_decoder().eval()
    batches = []
    hook = decoder.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        decoder.decode(features(3, 0), steps=4, cfg_scale=3.0, generator=seeded(0))
        assert batches == [6] * 4  # one call per step, conditional and unconditional stacked
        batches.clear()
        decoder.decode(features(3, 0), steps=4, cfg_scale=1.0, generator=seeded(0))
        assert batches == [3] * 4  # no guidance: no unconditional branch
    finally:
        hook.remove()


def test_guidance_zero_is_the_unconditional_model():
    decoder = make_decoder().eval()
    # With w = 0 only the zero-feature branch counts, so the features cannot matter.
    a = decoder.decode(features(2, 0), steps=2, cfg_scale=0.0, generator=seeded(0))
    b = decoder.decode(features(2, 1), steps=2, cfg_scale=0.0, generator=seeded(0))
    c = decoder.decode(features(2, 1), steps=2, cfg_scale=1.0, generator=seeded(0))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(b, c)


def test_decoder_save_load_round_trip(tmp_path, images):
    decoder = make_decoder().eval()
    with torch.no_grad():
        decoder.feature_pos_embed.add_(0.5)  # not its initial value, so loading it must really happen
    cond = features(2, 0)
    expected = decoder.decode(cond, steps=2, generator=seeded(0))
    with torch.no_grad():
        expected_loss = decoder.loss(images[:2], cond, seeded(0))
    decoder.save_pretrained(tmp_path)
    assert {"config.json", "unet", "scheduler", "feature_pos_embed.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = PixelDecoder.from_pretrained(tmp_path)
    assert loaded.config == decoder.config
    assert torch.equal(loaded.decode(cond, steps=2, generator=seeded(0)), expected)
    with torch.no_grad():
        assert torch.equal(loaded.loss(images[:2], cond, seeded(0)), expected_loss)


def test_decoder_config_checks_and_round_trips():
    config = decoder_config("tiny_pool2")
    assert config.num_feature_tokens == 16
    assert PixelDecoderConfig.from_dict(asdict(config)) == config
    with pytest.raises(ValueError, match="block type"):
        PixelDecoderConfig(block_out_channels=(32, 64))


# ---- VAE ------------------------------------------------------------------------------------------------


def make_vae(name: str = "micro", seed: int = 0) -> Vae:
    torch.manual_seed(seed)
    return Vae(vae_config(name))


def test_vae_shapes_and_scaling(images):
    vae = make_vae()
    with pytest.raises(RuntimeError, match="not fitted"):
        vae.encode(images)
    vae.fit_scaling(images)
    with torch.no_grad():
        latents = vae.encode(images)
        assert latents.shape == (8, 4, 16, 16)
        # Standardised on the data it was fitted on.
        assert abs(latents.mean().item()) < 1e-4 and abs(latents.std().item() - 1) < 1e-4
        decoded = vae.decode(latents)
    assert decoded.shape == (8, 3, 64, 64)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert vae_config("tiny_8x8").latent_size == 8
    with pytest.raises(ValueError, match="not divisible"):
        VaeConfig(image_size=62)


def test_vae_presets_latent_shapes(images):
    for name, shape in (("tiny", (2, 4, 16, 16)), ("tiny_8x8", (2, 16, 8, 8))):
        vae = make_vae(name)
        vae.fit_scaling(images[:2])
        with torch.no_grad():
            assert vae.encode(images[:2]).shape == shape
        assert vae.decode(torch.zeros(shape)).shape == (2, 3, 64, 64)


def test_decoder_tiny_preset_shapes(images):
    decoder = PixelDecoder(decoder_config("tiny")).eval()
    assert decoder.decode(features(1, 0), steps=1, cfg_scale=1.0, generator=seeded(0)).shape == (1, 3, 64, 64)
    with torch.no_grad():
        assert decoder.loss(images[:1], features(1, 0), seeded(0)).shape == ()


def test_vae_loss_decreases(images):
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = vae.loss(images[:4], seeded(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_vae_save_load_round_trip(tmp_path, images):
    vae = make_vae().eval()
    vae.fit_scaling(images)
    with torch.no_grad():
        latents = vae.encode(images[:2])
        decoded = vae.decode(latents)
    vae.save_pretrained(tmp_path)
    loaded = Vae.from_pretrained(tmp_path)
    assert loaded.config == vae.config
    assert loaded.autoencoder.config.scaling_factor == vae.autoencoder.config.scaling_factor
    assert loaded.autoencoder.config.shift_factor == vae.autoencoder.config.shift_factor
    with torch.no_grad():
        assert torch.equal(loaded.encode(images[:2]), latents)
        assert torch.equal(loaded.decode(latents), decoded)


def test_pixel_shuffle_branch_starts_as_the_clip_pixel_head(tmp_path, images):
    """init_spatial_from_clip re-expresses CLIP's head exactly: at step 0 the decoder's spatial input is the
    head's rendering in the decoder's [-1, 1] pixel space; the branch's weights survive save/load."""
    import torch.nn.functional as F

    from blip3o.models.clip import ClipEncoder, clip_config, tokens_to_grid

    torch.manual_seed(0)
    clip = ClipEncoder(clip_config("tiny", reconstruction_weight=1.0)).eval()
    pil = tensor_to_images(images)
    pixels = clip.preprocess(pil)  # (8, 3, 64, 64)
    with torch.no_grad():
        clip.fit_feature_normalization(clip.encode_image_raw(pixels))
        clip.pixel_head.bias.normal_()  # a non-trivial bias, so the affine bookkeeping is exercised
    decoder = make_decoder(spatial_channels=3, spatial_upsample="pixel_shuffle")
    with pytest.raises(ValueError, match="no pixel head"):
        decoder.init_spatial_from_clip(ClipEncoder(clip_config("tiny")))
    with pytest.raises(ValueError, match="pixel_shuffle"):
        make_decoder(spatial_channels=3).init_spatial_from_clip(clip)
    decoder.init_spatial_from_clip(clip)
    with torch.no_grad():
        spatial = F.pixel_shuffle(decoder.feature_to_pixels(tokens_to_grid(clip.encode_image(pixels))), 8)
        head = clip.denormalize_pixels(clip.reconstruct_pixels(pixels))  # (8, 3, 64, 64) in [0, 1]
    assert spatial.shape == (8, 3, 64, 64)
    assert torch.allclose(spatial, 2 * head - 1, atol=1e-4)
    decoder.save_pretrained(tmp_path)
    loaded = PixelDecoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.feature_to_pixels.weight, decoder.feature_to_pixels.weight)
    with pytest.raises(ValueError, match="spatial_upsample"):
        PixelDecoderConfig(spatial_upsample="bilinear")


@pytest.mark.parametrize(("kernel", "reach"), [(1, 0), (3, 1)])
def test_spatial_kernel_sets_how_far_a_token_paints(kernel, reach):
    """With spatial_kernel k a token's features reach its own patch and the (k - 1) / 2 rings of patches around
    it, and no further: one token per object can then draw an object wider than its patch."""
    decoder = make_decoder(spatial_channels=2, spatial_upsample="pixel_shuffle", spatial_kernel=kernel)
    base = features(1, 0)
    moved = base.clone()
    moved[0, 3 * 8 + 4] += 1.0  # the token at row 3, column 4 of the 8x8 grid
    with torch.no_grad():
        change = decoder.spatial_input(moved) - decoder.spatial_input(base)  # (1, 2, 64, 64)
    change = change.abs().sum(dim=(0, 1))  # (64, 64)
    per_patch = change.reshape(8, 8, 8, 8).sum(dim=(1, 3))  # (8, 8): total change per patch
    rows, cols = (per_patch > 0).nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3 - reach, 3 + reach, 4 - reach, 4 + reach)
    assert len(rows) == (2 * reach + 1) ** 2
    with pytest.raises(ValueError, match="spatial_kernel"):
        PixelDecoderConfig(spatial_kernel=2)
