"""The DiT against the released BLIP3-o `NextDiTCrossAttn`: numeric parity on the tiny fixtures, state-dict
keys/shapes/parameter counts at the released 8B and 4B sizes, config errors, gradient checkpointing, bf16.

Fixtures: tests/fixtures/official_dit/ (a copy of shared/fixtures/official_dit, checksums in SHA256SUMS), or
$BLIP3O_FIXTURES/official_dit/.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip3o.models.dit import DiT, DiTConfig
from blip3o.models.dit_layers import rope_2d_table

_FIXTURE_ROOT = Path(os.environ.get("BLIP3O_FIXTURES", Path(__file__).resolve().parent / "fixtures"))
FIXTURES = _FIXTURE_ROOT / "official_dit"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"official DiT fixtures not found at {FIXTURES}"
)

VARIANTS = ("dit_tiny", "dit_tiny_gqa", "dit_tiny_p2")
OUTPUT_CALLS = {  # fixture tensor -> (timestep key, condition key) of the call that produced it
    "out": ("timestep", "z_latents"),
    "out_train_scale": ("timestep_train_scale", "z_latents"),
    "out_timestep_long": ("timestep_long", "z_latents"),
    "out_null_cond": ("timestep", "z_latents_null"),
}
ATOL = RTOL = 1e-5


def _fixture_model(variant: str) -> tuple[DiT, dict, dict[str, torch.Tensor]]:
    config_json = json.loads((FIXTURES / f"{variant}_config.json").read_text())
    model = DiT(DiTConfig.from_dict(config_json["config"])).eval()
    model.load_state_dict(load_file(FIXTURES / f"{variant}_weights.safetensors"), strict=True)
    return model, config_json, load_file(FIXTURES / f"{variant}_io.safetensors")


def _randomize(model: DiT, seed: int = 0) -> DiT:
    """Non-zero everything (init_weights zeroes gates and projections, which would hide gradient bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(".gate"):
                param.copy_(0.5 * noise)
            elif param.ndim == 2:
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


def _tiny_inputs(config: DiTConfig, batch: int = 2, cond_len: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    side = config.input_size
    x = torch.randn(batch, config.in_channels, side, side, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    condition = torch.randn(batch, cond_len, config.latent_embedding_size, generator=gen)
    return x, timestep, condition


# ---------------------------------------------------------------------------------------- (a) parity


@needs_fixtures
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_release(variant: str) -> None:
    model, config_json, io = _fixture_model(variant)
    assert model.num_params() == config_json["num_params"]
    # Same keys in the same order as the release (the fixture lists them in state-dict order).
    assert list(model.state_dict()) == list(config_json["init_scheme_by_param"])
    with torch.no_grad():
        for name, (t_key, cond_key) in OUTPUT_CALLS.items():
            out = model(io["x"], io[t_key], io[cond_key])
            print(f"{variant} {name}: max abs err {(out - io[name]).abs().max().item():.2e}")
            torch.testing.assert_close(out, io[name], atol=ATOL, rtol=RTOL)
    assert io["timestep_long"].dtype == torch.int64


@needs_fixtures
@pytest.mark.parametrize("variant", VARIANTS)
def test_intermediates_match_release(variant: str) -> None:
    model, _, io = _fixture_model(variant)
    net = model.model
    captured: dict[str, torch.Tensor] = {}

    def keep(key: str):
        return lambda module, args, output: captured.__setitem__(key, output)

    net.patch_embedder.register_forward_hook(keep("inter.patch_tokens"))
    net.caption_projection.register_forward_hook(keep("inter.caption_proj"))
    net.time_caption_embed.register_forward_hook(keep("inter.temb"))
    net.norm_out.register_forward_hook(keep("inter.norm_out"))
    for i, layer in enumerate(net.layers):
        layer.register_forward_hook(keep(f"inter.layer_{i}_out"))
    with torch.no_grad():
        model(io["x"], io["timestep"], io["z_latents"])

    assert sorted(captured) == sorted(k for k in io if k.startswith("inter."))
    for key, value in captured.items():
        print(f"{variant} {key}: max abs err {(value - io[key]).abs().max().item():.2e}")
        torch.testing.assert_close(value, io[key], atol=ATOL, rtol=RTOL)

    rope = net.rope.table  # (N, E/2, 2)
    print(f"{variant} rope: max abs err {(rope - io['rope.freqs_cis_real_imag']).abs().max().item():.2e}")
    torch.testing.assert_close(rope, io["rope.freqs_cis_real_imag"], atol=1e-6, rtol=0)


def test_rope_indexing_matches_release_layout() -> None:
    """Pair 2k of token (i, j) turns by i * f_k, pair 2k+1 by j * f_k, f_k = 10000^(-4k/E), any grid size."""
    head_dim, grid_h, grid_w = 16, 3, 5
    table = rope_2d_table(head_dim, grid_h, grid_w, theta=10000.0)
    assert table.shape == (grid_h * grid_w, head_dim // 2, 2) and table.dtype == torch.float32
    cos, sin = table.unbind(-1)
    for i in range(grid_h):
        for j in range(grid_w):
            for k in range(head_dim // 4):
                f = 10000.0 ** (-4 * k / head_dim)
                for pair, pos in ((2 * k, i), (2 * k + 1, j)):
                    assert cos[i * grid_w + j, pair].item() == pytest.approx(math.cos(pos * f), abs=1e-6)
                    assert sin[i * grid_w + j, pair].item() == pytest.approx(math.sin(pos * f), abs=1e-6)
    # A bigger grid holds the same factors at the same (i, j): like slicing the release's 384x384 table.
    big = rope_2d_table(head_dim, 7, 9, theta=10000.0)
    torch.testing.assert_close(
        big.view(7, 9, -1, 2)[:grid_h, :grid_w].reshape_as(table), table, atol=0, rtol=0
    )


def test_other_grid_sizes_run() -> None:
    config = DiTConfig.tiny()
    model = _randomize(DiT(config)).eval()
    x = torch.randn(2, config.in_channels, 6, 2)  # not the configured 4x4
    out = model(x, torch.tensor([10.0, 900.0]), torch.randn(2, 3, config.latent_embedding_size))
    assert out.shape == x.shape and torch.isfinite(out).all()


# -------------------------------------------------------------------------------- (b) released sizes


@needs_fixtures
@pytest.mark.parametrize(("size", "preset"), [("8b", DiTConfig.blip3o_8b), ("4b", DiTConfig.blip3o_4b)])
def test_released_state_dict_on_meta(size: str, preset) -> None:
    released = json.loads((FIXTURES / "dit_keys_official_8b.json").read_text())["models"][size]
    assert DiTConfig.from_dict(released["config"]) == preset()
    with torch.device("meta"):
        model = DiT(preset())
    ours = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    assert ours == [(key, list(shape)) for key, shape in released["keys"]]
    assert len(ours) == released["num_tensors"] == 642
    by_module = {
        name: sum(p.numel() for p in child.parameters()) for name, child in model.model.named_children()
    }
    by_module.pop("rope")
    assert by_module == released["params_by_top_level_module"]
    print(f"BLIP3-o {size} DiT parameters: {model.num_params():,} (release: {released['total_params']:,})")
    assert model.num_params() == released["total_params"]


def test_meta_build_then_materialise() -> None:
    with torch.device("meta"):
        model = DiT(DiTConfig.tiny())
    model.to_empty(device="cpu")
    model.init_weights()
    reference = DiT(DiTConfig.tiny())
    torch.testing.assert_close(model.model.rope.table, reference.model.rope.table, atol=0, rtol=0)
    assert "model.rope.table" not in model.state_dict()


# --------------------------------------------------------------------------------------- (c) errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dim": 66}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "not a multiple of n_kv_heads"),
        ({"dim": 40, "n_heads": 4}, "divisible by 4 for 2D RoPE"),
        ({"patch_size": 3}, "input_size 4 is not divisible by patch_size 3"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"in_channels": 2.0}, "in_channels must be a positive integer"),
        ({"ffn_dim_multiplier": -1.0}, "ffn_dim_multiplier must be positive"),
        ({"norm_eps": 0.0}, "norm_eps must be positive"),
        ({"cross_attention_gate_init": 1.0}, "tanh value in"),
    ],
)
def test_bad_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiTConfig.tiny(**overrides)


def test_config_dict_round_trip_and_errors() -> None:
    config = DiTConfig.tiny(n_kv_heads=2)
    assert DiTConfig.from_dict(config.to_dict()) == config
    assert DiTConfig.preset("blip3o_4b").latent_embedding_size == 2048
    assert DiTConfig.preset("blip3o_8b") == DiTConfig()
    with pytest.raises(ValueError, match="learn_sigma"):
        DiTConfig.from_dict({**config.to_dict(), "learn_sigma": True})
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiTConfig.from_dict({**config.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig.preset("huge")


def test_derived_sizes() -> None:
    assert DiTConfig.tiny().ffn_inner_dim == 256
    assert DiTConfig.tiny(patch_size=2, multiple_of=96).ffn_inner_dim == 288  # 256 rounded up
    assert DiTConfig.tiny(ffn_dim_multiplier=1.5).ffn_inner_dim == 384
    assert DiTConfig().ffn_inner_dim == 7168 and DiTConfig().temb_dim == 1024 and DiTConfig().head_dim == 64


def test_bad_inputs_error() -> None:
    config = DiTConfig.tiny()
    model = DiT(config)
    x, timestep, condition = _tiny_inputs(config)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :-1], timestep, condition)
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, timestep[:1], condition)
    with pytest.raises(ValueError, match="condition width"):
        model(x, timestep, condition[..., :-1])
    with pytest.raises(ValueError, match="multiples of 2"):
        DiT(DiTConfig.tiny(patch_size=2))(x[..., :3], timestep, condition)


# ------------------------------------------------------------------------------------ training paths


def test_gradient_checkpointing_same_output_and_gradients() -> None:
    config = DiTConfig.tiny(n_kv_heads=2)
    model = _randomize(DiT(config))
    x, timestep, condition = _tiny_inputs(config)

    def run(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        xs, conds = x.clone().requires_grad_(), condition.clone().requires_grad_()
        out = model(xs, timestep, conds)
        (out.square().mean() + out.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return out.detach(), grads, xs.grad, conds.grad

    out_plain, grads_plain, dx_plain, dc_plain = run(False)
    out_ckpt, grads_ckpt, dx_ckpt, dc_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx_ckpt, dx_plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dc_ckpt, dc_plain, atol=1e-6, rtol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert grad.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-6, msg=name)


def test_init_weights_predicts_zero_and_learns() -> None:
    config = DiTConfig.tiny()
    model = DiT(config)
    x, timestep, condition = _tiny_inputs(config)
    out = model(x, timestep, condition)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(layer.gate, torch.zeros(config.n_heads)) for layer in model.model.layers)
    out.sub(x).square().mean().backward()  # a velocity-like target
    assert model.model.norm_out.linear_2.weight.grad.abs().sum() > 0
    assert model.model.norm_out.linear_2.bias.grad.abs().sum() > 0


def test_cross_attention_gate_init_opens_the_condition_path_at_step_zero() -> None:
    """With the gates open at init, the cross-attention's keys and values get gradients on the first backward;
    with the release's zero gates they get none (only the pooled condition is read at first)."""
    grads = {}
    for value in (0.0, 0.5):
        config = DiTConfig.tiny(cross_attention_gate_init=value)
        model = DiT(config)
        layer = model.model.layers[0]
        assert torch.allclose(layer.gate.tanh(), torch.full((config.n_heads,), value))
        x, timestep, condition = _tiny_inputs(config)
        with torch.no_grad():  # open the blocks (adaLN-Zero keeps them the identity at init) and the output
            for block in model.model.layers:
                block.norm1.linear.bias.fill_(0.5)
            model.model.norm_out.linear_2.weight.normal_(std=0.1)
        model(x, timestep, condition).square().mean().backward()
        grads[value] = layer.attn2.to_v.weight.grad.abs().sum().item()
    assert grads[0.0] == 0
    assert grads[0.5] > 0


def test_bf16_autocast_close_to_fp32() -> None:
    config = DiTConfig.tiny()
    model = _randomize(DiT(config)).eval()
    x, timestep, condition = _tiny_inputs(config)
    with torch.no_grad():
        reference = model(x, timestep, condition)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = model(x, timestep, condition)
        bf16_model = model.to(torch.bfloat16)  # RoPE table is then recomputed in fp32 each call
        bf16_out = bf16_model(x.bfloat16(), timestep, condition.bfloat16())
    for out in (autocast_out, bf16_out):
        assert out.dtype == torch.bfloat16
        relative = (out.float() - reference).norm() / reference.norm()
        print(f"bf16 relative error: {relative.item():.3e}")
        assert relative < 3e-2
