"""The DiT locality probe (blip3o.eval.locality): exact answers on networks whose Jacobian is known."""

from __future__ import annotations

import pytest
import torch

from blip3o.eval.locality import SHARES, linear_denoiser_shares, locality_shares, self_attention_shares
from blip3o.models.dit import DiT, DiTConfig


def _inputs(batch=3, channels=8, side=5):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, channels, side, side, generator=generator)  # (B, C, h, w)
    condition = torch.randn(batch, 2, 6, generator=generator)  # (B, Q, H)
    return x0, condition


def test_zero_velocity_is_purely_local():
    """v = 0 gives x0_hat = x_s: the Jacobian is the identity, so each token reads only itself."""
    x0, condition = _inputs()
    shares = locality_shares(lambda x, t, c: torch.zeros_like(x), x0, condition, 0.7, torch.Generator())
    assert shares == pytest.approx({"self": 1.0, "neighbours": 0.0, "rest": 0.0})


def test_grid_mean_velocity_reads_every_token_equally_off_itself():
    """v = x_s - mean over the grid: x0_hat = (1 - s) x_s + s mean(x_s), so d x0_hat_i / d x_s,j is
    (1 - s + s / N) I on j = i and (s / N) I elsewhere; the shares follow exactly (up to the projections'
    sampling error, which is zero here because every block of the Jacobian is a multiple of the identity
    and the same projection reaches every input token)."""
    x0, condition = _inputs(side=5)
    sigma, n = 0.6, 25

    def mean_field(x, t, c):
        return x - x.mean(dim=(2, 3), keepdim=True).expand_as(x)

    shares = locality_shares(
        mean_field, x0, condition, sigma, torch.Generator().manual_seed(1), projections=3
    )
    own, other = (1 - sigma + sigma / n) ** 2, (sigma / n) ** 2
    whole = own + (n - 1) * other
    assert shares["self"] == pytest.approx(own / whole, rel=1e-6)
    assert shares["neighbours"] == pytest.approx(8 * other / whole, rel=1e-6)
    assert shares["rest"] == pytest.approx(16 * other / whole, rel=1e-6)


def test_trained_like_dit_shares_sum_to_one_and_reach_the_neighbours():
    config = DiTConfig.tiny(input_size=5, in_channels=8, latent_embedding_size=6)
    dit = DiT(config)
    with torch.no_grad():  # open the zero-initialised paths so the blocks mix tokens
        for parameter in dit.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x0, condition = _inputs()
    shares = locality_shares(dit, x0, condition, 0.7, torch.Generator().manual_seed(0))
    assert set(shares) == set(SHARES)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["neighbours"] > 0 and shares["rest"] > 0 and shares["self"] < 1


def test_linear_reference_independent_tokens_are_local_and_correlated_ones_are_not():
    generator = torch.Generator().manual_seed(0)
    independent = torch.randn(400, 2, 4, 4, generator=generator)  # (N, C, h, w) white: S = I
    shares = linear_denoiser_shares(independent, [0.5])[0.5]
    assert shares["self"] > 0.9  # only sampling noise in the fitted covariance links tokens
    shared = torch.randn(400, 2, 1, 1, generator=generator).expand(400, 2, 4, 4)  # every token equal
    tied = shared + 0.1 * torch.randn(400, 2, 4, 4, generator=generator)
    shares = linear_denoiser_shares(tied, [0.5])[0.5]
    assert shares["self"] < 0.3 and shares["neighbours"] + shares["rest"] > 0.7


def test_grids_without_an_interior_token_are_refused():
    x0, condition = _inputs(side=2)
    with pytest.raises(ValueError, match="no interior token"):
        locality_shares(lambda x, t, c: x, x0, condition, 0.5, torch.Generator())
    with pytest.raises(ValueError, match="no interior token"):
        linear_denoiser_shares(x0, [0.5])


def test_self_attention_shares_of_a_fresh_dit_are_near_uniform_and_bounded():
    """A fresh DiT's queries and keys are unrelated, so each head spreads its weight about evenly; the
    shares are weights, so they lie in [0, 1] and self + neighbours <= 1."""
    config = DiTConfig.tiny(input_size=5, in_channels=8, latent_embedding_size=6)
    dit = DiT(config)
    x0, condition = _inputs()
    shares = self_attention_shares(dit, x0, condition, 0.5, torch.Generator().manual_seed(0))
    assert shares.shape == (config.n_layers, config.n_heads, 2)
    assert (shares >= 0).all() and (shares.sum(-1) <= 1 + 1e-6).all()
    # qk-norm at init: logits of order 1, so no head is anywhere near one-hot on itself
    assert shares[..., 0].max() < 0.5


def test_self_attention_shares_see_a_head_that_attends_to_itself():
    """Queries equal to keys, scaled up, make each head attend mostly to its own token (not exactly only:
    per head the LayerNormed vectors differ in length, so a longer neighbour can win a row now and then)."""
    config = DiTConfig.tiny(input_size=5, in_channels=8, latent_embedding_size=6)
    dit = DiT(config)
    with torch.no_grad():
        for layer in dit.model.layers:
            layer.attn1.to_k.weight.copy_(layer.attn1.to_q.weight)
            layer.attn1.norm_q.weight.fill_(20.0)
            layer.attn1.norm_k.weight.fill_(20.0)
    dit.model.rope.table[..., 0] = 1.0  # no rotation, so q_i . k_i = |q_i|^2 is large
    dit.model.rope.table[..., 1] = 0.0
    x0, condition = _inputs()
    shares = self_attention_shares(dit, x0, condition, 0.5, torch.Generator().manual_seed(0))
    assert shares[..., 0].min() > 0.5 and shares[..., 0].mean() > 0.8  # uniform would be 1/25 = 0.04
