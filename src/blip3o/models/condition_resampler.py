"""Condition resampler: S slot tokens read the backbone's query states by cross-attention (ours, not the release's).

Why: at ShapesWorld scale every one of the 64 query states holds every object of the prompt at once (a ridge
probe reads the first and the second object's shape and colour from any single state), so no condition token
stands for one object. The DiT binds colour to shape well from one token per object (a "bag": token-level
ShapesGenEval 0.63 after 1,800 steps, against 0.09 from the query states; bench/ideal_target.py), and a
resampler taught to put the k-th named object into slot k (train/slot_supervision.py) gives it that form:
0.29 overall and colour attribution 0.54 on the same bench (docs/bench/object_target.txt, session 22).

Off in the released presets (`DiTConfig.condition_slots = 0`): the release's DiT reads the query states
directly. When on, it lives in the DiT (`DiT.resampler`), so it trains, saves and shards with it.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionResampler(nn.Module):
    """(B, L, W) condition -> (B, S, W) slot tokens: learnt slot queries, then `layers` pre-norm transformer
    decoder layers (self-attention among the slots, cross-attention to the condition, MLP), then a LayerNorm.

    A zeroed condition (classifier-free guidance's unconditional branch) gives learnt constant slots."""

    def __init__(self, width: int, slots: int, layers: int, heads: int) -> None:
        super().__init__()
        self.slots = nn.Parameter(torch.zeros(1, slots, width))  # (1, S, W); set by reset_parameters
        self.norm_in = nn.LayerNorm(width)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm_out = nn.LayerNorm(width)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Slots N(0, 0.02); attention input projections xavier-uniform with zero bias (as torch's own
        initialisation, repeated here because models built on the meta device are initialised afterwards)."""
        nn.init.normal_(self.slots, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                nn.init.xavier_uniform_(module.in_proj_weight)
                nn.init.zeros_(module.in_proj_bias)

    def forward(self, condition: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, W) condition -> (B, S, W) slots; `key_padding_mask` (B, L), True where a condition token is
        padding the slots must not read (None: every token is read, as the recipe's fixed-length condition)."""
        memory = self.norm_in(condition)  # (B, L, W)
        x = self.slots.to(memory.dtype).expand(len(condition), -1, -1)  # (B, S, W)
        for layer in self.layers:
            x = layer(x, memory, memory_key_padding_mask=key_padding_mask)  # (B, S, W)
        return self.norm_out(x)  # (B, S, W)
