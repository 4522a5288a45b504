"""How much the DiT's guess of the clean target at one token reads the other tokens (its locality).

An object in a ShapesWorld image covers 2x2 to 3x3 of the 8x8 target tokens, and its shape only exists across
them, so a DiT that draws clean shapes must make each token's guess agree with its neighbours'. This module
measures how much it does; `bench/dit_locality.py` prints it for a saved model.

At noise level s the DiT's guess of x0 is x0_hat = x_s - s v(x_s). For an interior grid token i, the squared
Frobenius norm of its Jacobian, sum_j |d x0_hat_i / d x_s,j|^2, is split into three shares: token i itself,
its 8 neighbours and the rest of the grid. The norms are estimated with random projections
(E |J^T r|^2 = |J|_F^2 for r ~ N(0, I)).
"""

from __future__ import annotations

import torch

from blip3o.transport.flow_matching import interpolate

SHARES = ("self", "neighbours", "rest")


def _require_interior(height: int, width: int) -> None:
    """Every share is taken over interior tokens (those with 8 neighbours): refuse grids without one."""
    if min(height, width) < 3:
        raise ValueError(f"the target grid {height}x{width} has no interior token (needs at least 3x3)")


def _noised(
    x0: torch.Tensor, sigma: float, generator: torch.Generator, timestep_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_s (B, C, h, w) at level `sigma` with noise from `generator`, and the DiT's timestep (B,)."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)  # (B, C, h, w)
    x_s = interpolate(x0, noise, torch.full((batch,), sigma))  # (B, C, h, w)
    return x_s, torch.full((batch,), sigma * timestep_scale)


def locality_shares(
    dit: torch.nn.Module,
    x0: torch.Tensor,
    condition: torch.Tensor,
    sigma: float,
    generator: torch.Generator,
    projections: int = 2,
    timestep_scale: float = 1000.0,
) -> dict[str, float]:
    """Shares (summing to 1) of |d x0_hat_i / d x_s|^2 coming from token i, its 8 neighbours and the rest,
    pooled over every sample and interior token i.

    dit(x (B, C, h, w), timestep (B,), condition) -> velocity; x0 (B, C, h, w) targets; condition (B, Q, H).
    """
    height, width = x0.shape[2:]
    _require_interior(height, width)
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    x_s, timestep = _noised(x0, sigma, generator, timestep_scale)  # (B, C, h, w), (B,)
    x_s.requires_grad_(True)
    with torch.enable_grad():
        x0_hat = x_s - sigma * dit(x_s, timestep, condition)  # (B, C, h, w)

    energy = torch.zeros(height, width, height, width, dtype=torch.float64)  # (h, w) outputs x (h, w) inputs
    for i in range(1, height - 1):
        for j in range(1, width - 1):
            for _ in range(projections):
                r = torch.randn(x0_hat[:, :, i, j].shape, generator=generator)  # (B, C)
                (grad,) = torch.autograd.grad((x0_hat[:, :, i, j] * r).sum(), x_s, retain_graph=True)
                energy[i, j] += grad.pow(2).sum(dim=(0, 1)).double()  # (h, w): |J_i,j^T r|^2 per input token
    return _split_energy(energy)


def _split_energy(jacobian_energy: torch.Tensor) -> dict[str, float]:
    """(h, w, h, w) energy of output token (i, j) from input token (k, l) -> the three shares, over interior i, j."""
    height, width = jacobian_energy.shape[:2]
    totals = dict.fromkeys(SHARES, 0.0)
    for i in range(1, height - 1):
        for j in range(1, width - 1):
            energy = jacobian_energy[i, j]  # (h, w)
            own = float(energy[i, j])
            block = float(energy[i - 1 : i + 2, j - 1 : j + 2].sum())
            totals["self"] += own
            totals["neighbours"] += block - own
            totals["rest"] += float(energy.sum()) - block
    whole = sum(totals.values())
    return {name: value / whole for name, value in totals.items()}


@torch.no_grad()
def linear_denoiser_shares(targets: torch.Tensor, sigmas: list[float]) -> dict[float, dict[str, float]]:
    """The same shares for the best *linear* guess of x0 from x_s, fitted on `targets` (N, C, h, w): a reference.

    With the targets' covariance S = V diag(l) V^T, the least-squares linear estimate of x0 from
    x_s = (1 - s) x0 + s noise has the Jacobian (1 - s) S ((1 - s)^2 S + s^2 I)^-1 = V diag(f) V^T with
    f = (1 - s) l / ((1 - s)^2 l + s^2). It uses only second-order statistics: a reference for how much the
    data's correlations tie a token to its neighbours, not a bound on what a nonlinear denoiser needs (one that
    knows the tokens' clustered distribution can read more from the token itself).
    """
    n, channels, height, width = targets.shape
    _require_interior(height, width)
    flat = targets.reshape(n, -1).double()  # (N, C*h*w)
    flat = flat - flat.mean(dim=0)
    _, singular, basis = torch.linalg.svd(flat / n**0.5, full_matrices=False)  # basis (r, C*h*w)
    eigen = singular.pow(2)  # (r,) covariance eigenvalues
    result = {}
    for sigma in sigmas:
        gain = (1 - sigma) * eigen / ((1 - sigma) ** 2 * eigen + sigma**2)  # (r,)
        jacobian = (basis.T * gain) @ basis  # (C*h*w, C*h*w)
        jacobian = jacobian.view(channels, height, width, channels, height, width)
        energy = jacobian.pow(2).sum(dim=(0, 3))  # (h, w, h, w) output token, input token
        result[sigma] = _split_energy(energy)
    return result


@torch.no_grad()
def self_attention_shares(
    dit: torch.nn.Module,
    x0: torch.Tensor,
    condition: torch.Tensor,
    sigma: float,
    generator: torch.Generator,
    timestep_scale: float = 1000.0,
) -> torch.Tensor:
    """Where each self-attention head looks: (layers, heads, 2) mean weight an interior query token puts on
    itself and on its 8 neighbours, at noise level `sigma`. Uniform attention over an h x w grid gives
    1 / (h w) and 8 / (h w).

    `dit` is a `blip3o.models.dit.DiT`; its blocks' `attn1` inputs are captured with hooks and their softmax
    weights recomputed with `Attention.attention_weights`.
    """
    height, width = x0.shape[2:]
    _require_interior(height, width)
    layers = dit.model.layers
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        x, context, rope = args[:3]
        captured.append(module.attention_weights(x, context, rope, rotate_keys=True).mean(dim=0))  # (H, N, N)

    handles = [layer.attn1.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        dit(*_noised(x0, sigma, generator, timestep_scale), condition)
    finally:
        for handle in handles:
            handle.remove()

    p = dit.config.patch_size
    grid_h, grid_w = height // p, width // p
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (N,) each, row-major as the DiT orders its tokens
    interior = (rows > 0) & (rows < grid_h - 1) & (cols > 0) & (cols < grid_w - 1)  # (N,)
    block = ((rows[:, None] - rows[None]).abs() <= 1) & ((cols[:, None] - cols[None]).abs() <= 1)  # (N, N)
    own = torch.eye(len(rows), dtype=torch.bool)  # (N, N)
    shares = []
    for weights in captured:  # (H, N, N) query x key
        on_self = (weights * own).sum(-1)[:, interior].mean(-1)  # (H,)
        on_neighbours = (weights * (block & ~own)).sum(-1)[:, interior].mean(-1)  # (H,)
        shares.append(torch.stack([on_self, on_neighbours], dim=-1))  # (H, 2)
    return torch.stack(shares)  # (layers, H, 2)
