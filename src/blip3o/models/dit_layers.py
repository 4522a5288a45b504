"""Building blocks of the Lumina-Next-style DiT (`blip3o.models.dit`).

Module and attribute names follow the released BLIP3-o `NextDiTCrossAttn` so that its state dict loads
unchanged; where a name reads oddly (the shared output projection living in `attn2`, `norm1` holding the
adaLN modulation) the reason is that compatibility.

Precision: the model is meant to run under bf16 autocast with fp32 weights. The pieces that lose too much
in bf16 are computed in fp32 here, as in the release: RMSNorm statistics, the timestep sinusoid, the RoPE
rotation and the FFN SiLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

QK_NORM_EPS = 1e-5  # LayerNorm over all heads of q and k
CAPTION_POOL_NORM_EPS = 1e-5  # LayerNorm on the mean-pooled condition (nn.LayerNorm's default)
FINAL_NORM_EPS = 1e-6  # affine-free LayerNorm before the output projection
TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features
TIMESTEP_MAX_PERIOD = 10000.0


# ----------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32.

    The result takes the weight's dtype: fp32 weights under bf16 autocast keep the residual stream in
    fp32 (as in the release); a model cast to bf16 stays bf16.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D) fp32
        return normed.to(self.weight.dtype) * self.weight


class ModulatedRMSNorm(nn.Module):
    """adaLN for one block: RMSNorm scaled by (1 + shift-free scale) from the conditioning embedding.

    `linear` maps SiLU(temb) to four vectors: attention scale, attention gate, FFN scale, FFN gate.
    """

    def __init__(self, dim: int, temb_dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, 4 * dim)
        self.norm = RMSNorm(dim, eps)

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        modulation = self.linear(F.silu(temb))[:, None, :]  # (B, 1, 4D)
        scale_attn, gate_attn, scale_ffn, gate_ffn = modulation.chunk(4, dim=-1)  # 4 x (B, 1, D)
        return self.norm(h) * (1 + scale_attn), gate_attn, scale_ffn, gate_ffn


# ------------------------------------------------------------------------------------------------ RoPE


def rope_2d_table(
    head_dim: int, grid_h: int, grid_w: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    """The 2D rotary factors for a row-major (grid_h, grid_w) token grid: (N, E/2, 2) fp32 (cos, sin).

    A head vector is read as head_dim/2 pairs; pair 2k rotates by row * f_k and pair 2k+1 by column * f_k,
    with f_k = theta^(-4k/head_dim). Position (i, j) gets the same angles whatever the grid size, so this
    equals the release's 384x384 table sliced to the grid.
    """
    half = head_dim // 2
    # Same fp32 expression as the release, so the frequencies agree to the bit.
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))  # (E/4,)
    row_angles = torch.outer(torch.arange(grid_h, dtype=torch.float32, device=device), freqs)  # (Gh, E/4)
    col_angles = torch.outer(torch.arange(grid_w, dtype=torch.float32, device=device), freqs)  # (Gw, E/4)
    quarter = freqs.numel()
    angles = torch.stack(
        [
            row_angles[:, None, :].expand(grid_h, grid_w, quarter),
            col_angles[None, :, :].expand(grid_h, grid_w, quarter),
        ],
        dim=-1,
    )  # (Gh, Gw, E/4, 2): row angle, then column angle, for each frequency
    angles = angles.reshape(grid_h * grid_w, half)  # (N, E/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (N, E/2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive pair (x_2m, x_2m+1) of every head, as the complex number x_2m + i x_2m+1
    times the unit factor m of its token, in fp32.

    x: (B, N, H, E); rope: (N, E/2) complex64. Returns x's dtype.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, N, H, E/2) complex
    return torch.view_as_real(pairs * rope[:, None, :]).flatten(-2).to(x.dtype)  # (B, N, H, E)


class Rope2D(nn.Module):
    """The RoPE factors for the configured token grid, as a non-persistent (not saved) fp32 table.

    Other grid sizes are computed on the fly. So is the default grid when the table is no longer fp32
    (a `.to(torch.bfloat16)` of the module casts buffers too; rounded factors would be wrong). The table
    is kept real, (N, E/2, 2), for that reason and because some tools handle complex buffers badly; it is
    viewed as complex, without a copy, at use.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.grid_size = grid_size
        self.theta = theta
        self.register_buffer("table", rope_2d_table(head_dim, grid_size, grid_size, theta), persistent=False)

    @torch.no_grad()
    def reset_table(self) -> None:
        """Recompute the table in place, e.g. after `to_empty()` left it uninitialised."""
        self.table = rope_2d_table(
            self.head_dim, self.grid_size, self.grid_size, self.theta, self.table.device
        )

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Returns (grid_h * grid_w, E/2) complex64 unit factors."""
        if grid_h == grid_w == self.grid_size and self.table.dtype == torch.float32:
            return torch.view_as_complex(self.table)
        return torch.view_as_complex(
            rope_2d_table(self.head_dim, grid_h, grid_w, self.theta, self.table.device)
        )


# ------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention core with LayerNorm qk-norm over all heads; returns per-head outputs.

    The release has no per-attention output projection: the block sums the self- and cross-attention
    heads and projects them once with `attn2.to_out[0]`, so only the cross-attention owns `to_out`.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, output_projection: bool
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        q_dim, kv_dim = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.norm_q = nn.LayerNorm(q_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.norm_k = nn.LayerNorm(kv_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.to_q = nn.Linear(dim, q_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_dim, bias=False)
        if output_projection:
            self.to_out = nn.ModuleList([nn.Linear(q_dim, dim, bias=False)])  # named to_out.0 in the release

    def _heads(
        self, x: torch.Tensor, context: torch.Tensor, rope: torch.Tensor, rotate_keys: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, N, E), k and v (B, Hkv, M, E) in the projections' dtype, q (and k if rotate_keys) rotated."""
        q = self.norm_q(self.to_q(x))  # (B, N, H*E)
        k = self.norm_k(self.to_k(context))  # (B, M, Hkv*E)
        v = self.to_v(context)  # (B, M, Hkv*E)
        compute_dtype = v.dtype  # the projections' dtype (bf16 under autocast); qk-norm may have upcast
        q = apply_rope(q.unflatten(-1, (self.n_heads, self.head_dim)), rope)  # (B, N, H, E)
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, M, Hkv, E)
        if rotate_keys:
            k = apply_rope(k, rope)
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, M, Hkv, E)
        return (
            q.to(compute_dtype).transpose(1, 2),  # (B, H, N, E)
            k.to(compute_dtype).transpose(1, 2),  # (B, Hkv, M, E)
            v.transpose(1, 2),  # (B, Hkv, M, E)
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: torch.Tensor,
        rotate_keys: bool,
    ) -> torch.Tensor:
        """x: (B, N, D) queries' input; context: (B, M, D) keys' and values' input; rope: (N, E/2) complex.
        Returns (B, N, H, E).

        Queries are always image tokens and always rotated; keys are rotated only when they are image
        tokens too (self-attention), not when they are condition tokens.
        """
        q, k, v = self._heads(x, context, rope, rotate_keys)
        out = F.scaled_dot_product_attention(
            q, k, v, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, N, E); query head i reads kv head i // (H / Hkv)
        return out.transpose(1, 2)  # (B, N, H, E)

    def attention_weights(
        self, x: torch.Tensor, context: torch.Tensor, rope: torch.Tensor, rotate_keys: bool
    ) -> torch.Tensor:
        """The softmax weights `forward` applies, (B, H, N, M) in fp32 (for inspection and attention losses)."""
        q, k, _ = self._heads(x, context, rope, rotate_keys)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, M, E)
        return (q.float() @ k.float().transpose(-1, -2) * self.head_dim**-0.5).softmax(dim=-1)  # (B, H, N, M)


# ------------------------------------------------------------------------------------------------- FFN


class FeedForward(nn.Module):
    """SwiGLU: linear_2(SiLU(linear_1 x) * linear_3 x), no biases, SiLU in fp32."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner_dim, bias=False)
        self.linear_2 = nn.Linear(inner_dim, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.linear_1(x)  # (B, N, F)
        gate = F.silu(gate.float()).to(gate.dtype)  # (B, N, F)
        return self.linear_2(gate * self.linear_3(x))  # (B, N, D)


# ----------------------------------------------------------------------------------------------- block


class DiTBlock(nn.Module):
    """One layer: adaLN-modulated self-attention + gated cross-attention (one shared output projection),
    then a modulated SwiGLU FFN; each residual branch is RMS-normalised and tanh-gated."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        ffn_inner_dim: int,
        temb_dim: int,
        norm_eps: float,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        # Registration order reproduces the release's state-dict order.
        self.gate = nn.Parameter(torch.zeros(n_heads))  # per-head cross-attention gate, used as tanh(gate)
        self.attn1 = Attention(dim, n_heads, n_kv_heads, qk_norm, output_projection=False)
        self.attn2 = Attention(dim, n_heads, n_kv_heads, qk_norm, output_projection=True)
        self.feed_forward = FeedForward(dim, ffn_inner_dim)
        self.norm1 = ModulatedRMSNorm(dim, temb_dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        self.norm1_context = RMSNorm(dim, norm_eps)
        # A list while the DiT records cross-attention weights (set and cleared by its forward). An attribute, not
        # an argument: FSDP2 rebuilds a unit's arguments when grad is on, so appends to a list argument were lost
        # (3 of 4 layers' weights never reached the binding loss under FSDP2, session 37).
        self.cross_attention_record: list[torch.Tensor] | None = None

    def forward(
        self, h: torch.Tensor, condition: torch.Tensor, temb: torch.Tensor, rope: torch.Tensor
    ) -> torch.Tensor:
        """h: (B, N, D) image tokens; condition: (B, L, D) projected condition; temb: (B, T);
        rope: (N, E/2) complex RoPE factors of the image tokens. While `cross_attention_record` is a list, it
        receives this block's cross-attention weights, (B, H, N, L) fp32 with their gradients (for a loss)."""
        x, gate_attn, scale_ffn, gate_ffn = self.norm1(h, temb)  # (B, N, D), 3 x (B, 1, D)
        self_heads = self.attn1(x, x, rope, rotate_keys=True)  # (B, N, H, E)
        context = self.norm1_context(condition)  # (B, L, D)
        cross_heads = self.attn2(x, context, rope, rotate_keys=False)  # (B, N, H, E)
        if self.cross_attention_record is not None:
            # Recomputed beside the fused kernel (it returns no weights): at M = a few slots this costs little.
            self.cross_attention_record.append(
                self.attn2.attention_weights(x, context, rope, rotate_keys=False)
            )
        cross_heads = cross_heads * self.gate.tanh()[:, None]  # (B, N, H, E)
        attn_out = self.attn2.to_out[0]((self_heads + cross_heads).flatten(2))  # (B, N, D)
        h = h + gate_attn.tanh() * self.norm2(attn_out)  # (B, N, D)
        ffn_out = self.feed_forward(self.ffn_norm1(h) * (1 + scale_ffn))  # (B, N, D)
        return h + gate_ffn.tanh() * self.ffn_norm2(ffn_out)  # (B, N, D)


# -------------------------------------------------------------------------------- embeddings and head


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): row-major p x p patches, each flattened in (c, row, col) order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        p = self.patch_size
        patches = x.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return self.proj(patches.reshape(b, (height // p) * (width // p), c * p * p))  # (B, N, D)


class CaptionProjection(nn.Module):
    """Condition tokens (B, L, latent_embedding_size) -> (B, L, D): Linear, tanh-GELU, Linear."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(condition), approximate="tanh"))  # (B, L, D)


def timestep_sinusoid(timestep: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM) -> torch.Tensor:
    """(B,) timesteps of any dtype -> (B, dim) fp32 features [cos(t w_k)..., sin(t w_k)...]."""
    half = dim // 2
    exponent = -math.log(TIMESTEP_MAX_PERIOD) * torch.arange(
        half, dtype=torch.float32, device=timestep.device
    )
    freqs = torch.exp(exponent / half)  # (dim/2,)
    angles = timestep.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear, SiLU, Linear."""

    def __init__(self, temb_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_FREQ_DIM, temb_dim)
        self.linear_2 = nn.Linear(temb_dim, temb_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))  # (B, T)


class TimestepConditionEmbed(nn.Module):
    """temb = MLP(sinusoid(t)) + Linear(LayerNorm(mean over tokens of the projected condition))."""

    def __init__(self, dim: int, temb_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(temb_dim)
        self.caption_embedder = nn.Sequential(
            nn.LayerNorm(dim, eps=CAPTION_POOL_NORM_EPS), nn.Linear(dim, temb_dim)
        )

    def forward(self, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """timestep: (B,); condition: (B, L, D) projected condition. Returns (B, T)."""
        features = timestep_sinusoid(timestep).to(condition.dtype)  # (B, 256)
        # Nothing is ever masked in BLIP3-o, so the release's masked mean is a plain mean (taken in fp32).
        pooled = condition.float().mean(dim=1).to(condition.dtype)  # (B, D)
        return self.timestep_embedder(features) + self.caption_embedder(pooled)  # (B, T)


class FinalLayer(nn.Module):
    """Affine-free LayerNorm scaled by (1 + Linear(SiLU(temb))), then the output projection. No gate."""

    def __init__(self, dim: int, temb_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(temb_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(h.dtype))[:, None, :]  # (B, 1, D)
        normed = F.layer_norm(h, h.shape[-1:], eps=FINAL_NORM_EPS)  # (B, N, D)
        return self.linear_2(normed * (1 + scale))  # (B, N, p*p*C)
