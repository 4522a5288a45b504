"""A deeper DiT that samples exactly as the one it comes from (depth up-scaling by gated-off layer copies).

Each layer named in `copies` gets a copy inserted right after it whose two adaLN gates (attention and FFN, rows of
`norm1.linear`; dit_layers.DiTBlock adds each branch times tanh(gate)) are zero: the copy is the identity, so the
deeper model samples exactly as before until training opens the gates, and its other weights start as the copied
layer's, not as noise. Used by a stage's `deepen_dit_after` (train/config.py) and by tools/deepen_dit.py.

Why: the way to try a larger DiT without training the generation stages again (~2.2 h here). Session 61
(docs/bench/object_target.txt): 4 -> 6 layers (copies of 1 and 3) and `count`, `count_shape`, `count_apart` trained
again: counting tokens 0.673 against 0.603 for the same stages on 4 layers (600 samples each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from blip3o.models.blip3o import Blip3o
from blip3o.models.dit import DiT

LAYER_PREFIX = "model.layers."
GATE_ROWS = (1, 3)  # of the four chunks of norm1.linear: scale_attn, gate_attn, scale_ffn, gate_ffn


def layer_plan(n_layers: int, copies: Sequence[int]) -> list[tuple[int, bool]]:
    """(source layer, is a gated-off copy) for each layer of the deeper DiT, in order. ValueError for copies
    that are not distinct layers of the DiT."""
    bad = [i for i in copies if not 0 <= i < n_layers]
    if bad or len(set(copies)) != len(copies):
        raise ValueError(f"layer copies must be distinct layers in 0..{n_layers - 1}, got {list(copies)}")
    plan = []
    for i in range(n_layers):
        plan.append((i, False))
        if i in copies:
            plan.append((i, True))
    return plan


def deepen(model: Blip3o, copies: Sequence[int]) -> Blip3o:
    """A model sharing `model`'s backbone, CLIP and decoder whose DiT has the gated-off layer copies inserted
    (same samples, len(copies) more layers; eval mode)."""
    plan = layer_plan(model.config.dit.n_layers, copies)
    dit_config = dataclasses.replace(model.config.dit, n_layers=len(plan))
    old = model.dit.state_dict()
    new = {k: v for k, v in old.items() if not k.startswith(LAYER_PREFIX)}
    for target, (source, is_copy) in enumerate(plan):
        prefix = f"{LAYER_PREFIX}{source}."
        for key, value in old.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            value = value.clone()
            if is_copy and name in ("norm1.linear.weight", "norm1.linear.bias"):
                chunk = value.shape[0] // 4
                for row in GATE_ROWS:
                    value[row * chunk : (row + 1) * chunk] = 0
            new[f"{LAYER_PREFIX}{target}.{name}"] = value
    dit = DiT(dit_config)
    dit.load_state_dict(new, strict=True)
    config = dataclasses.replace(model.config, dit=dit_config)
    return Blip3o(config, model.backbone, model.clip, model.decoder, dit=dit, vae=model.vae).eval()
