"""Which of several pixel decodes of one DiT output to keep: the one whose CLIP reading agrees best with it.

Why: the diffusion decoder's own noise decides whether two near objects come out as two or as one. On the
bundle of session 56 (runs/s58/decoder_pick.py, counting prompts, 150 DiT samples, 4 decodes each), 97 samples'
tokens had the right count and only 57 of those kept it in all 4 decodes; the judge passed 0.573 of first
decodes and 0.647 of the decodes chosen here (two_object 0.745 -> 0.805). The choice uses the model alone: each
decode is read back by its own CLIP, never by the judge and never against the prompt. The backbone's own count
of each decode (its vision tower, asked "how many shapes are there?" with the DiT output's count as the answer)
picks no better (session 60, 600 counting samples, 4 decodes: 0.583 against 0.580; runs/s60/vlm_pick.py).

Agreement, best first: (1) with an object label head (`ClipConfig.patch_label_kind == "object"`), how many
objects the two readings do not share, counted as (shape, colour) pairs (a merged or dropped object costs 1,
a recoloured one 2); (2) the mean squared distance between the decode's target and the DiT's (ties, and
models without such a head).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from blip3o.models.clip import ClipEncoder, grid_to_tokens


def _named_objects(clip: ClipEncoder, target_tokens: Tensor) -> list[Counter]:
    """(B, N, C) targets -> per row, the label head's objects as a multiset of (shape, colour)."""
    # The label head's reading rule lives with its training losses; imported here so models/ stays light.
    from blip3o.train.scene_supervision import object_label_detections

    readings = clip.patch_labels_from_target(target_tokens)  # (B, N, 19)
    return [Counter((d.shape, d.color) for d in object_label_detections(r)) for r in readings]


def reads_objects(clip: ClipEncoder) -> bool:
    """Whether `clip` has the object label head the first criterion reads."""
    return clip.label_head is not None and clip.config.patch_label_kind == "object"


@torch.no_grad()
def decode_disagreements(clip: ClipEncoder, target: Tensor, decodes: Sequence[Tensor]) -> list[Tensor]:
    """How far each of K decodes is from the DiT output they draw: K tensors (B, 2) float, lexicographic (lower is
    better). The DiT output's objects are read once for all K.

    target (B, C, g, g): the DiT's output; each decode (B, C, g, g): the same model's target of the decoded images
    (`Blip3o.encode_target`). Column 0: objects the two label-head readings do not share (0 without such a
    head); column 1: mean squared distance."""
    wanted = grid_to_tokens(target.float())  # (B, N, C)
    wanted_objects = _named_objects(clip, wanted) if reads_objects(clip) else None
    scores = []
    for decoded in decodes:
        got = grid_to_tokens(decoded.float())  # (B, N, C)
        distance = (wanted - got).pow(2).flatten(1).mean(1)  # (B,)
        missing = torch.zeros_like(distance)
        if wanted_objects is not None:
            pairs = zip(wanted_objects, _named_objects(clip, got), strict=True)
            missing = torch.tensor(
                [sum(((a - b) + (b - a)).values()) for a, b in pairs],
                dtype=distance.dtype,
                device=distance.device,
            )  # (B,)
        scores.append(torch.stack([missing, distance], dim=1))  # (B, 2)
    return scores


def decode_disagreement(clip: ClipEncoder, target: Tensor, decoded: Tensor) -> Tensor:
    """One decode's (B, 2) disagreement with the DiT output (`decode_disagreements` with K = 1)."""
    return decode_disagreements(clip, target, [decoded])[0]


def best_candidate(disagreements: list[Tensor]) -> Tensor:
    """K tensors (B, 2) from `decode_disagreement` -> (B,) index of each row's best candidate; the earliest wins
    a full tie."""
    scores = torch.stack(disagreements, dim=1)  # (B, K, 2)
    rows, k = scores.shape[:2]
    best = torch.zeros(rows, dtype=torch.long)
    for row in range(rows):
        best[row] = min(range(k), key=lambda c: (scores[row, c, 0].item(), scores[row, c, 1].item()))
    return best
