"""Sample diversity: how different a model's images for one prompt are, in the project's CLIP feature space.

Definition (the design study's): for each prompt, draw `n` images (one generate call, different noise), embed
them with `clip_image_features` (L2-normalised CLIP image embeddings) and take the mean over all pairs of the
cosine distance 1 - cos(a, b); the score is the mean over prompts. Identical samples score 0; the maximum is 2
(opposite embeddings). For unit vectors 1 - cos(a, b) = |a - b|^2 / 2, so this is half the mean squared
Euclidean distance.

`target_diversity` applies the same distance to what the DiT itself produced (CLIP feature grids or VAE latents,
flattened), before any pixel decoder: it isolates the generator's own randomness. A CLIP + MSE model gives 0
there by construction (one deterministic prediction per prompt); its images still vary a little because the
diffusion pixel decoder draws its own noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blip3o.eval.clip_features import clip_image_features

if TYPE_CHECKING:
    from blip3o.models.blip3o import Blip3o
    from blip3o.models.clip import ClipEncoder


def mean_pairwise_cosine_distance(features: torch.Tensor) -> float:
    """Mean over the n(n-1)/2 pairs of rows of 1 - cos(a, b), for features (n, d), n >= 2.

    Computed as |a/|a| - b/|b||^2 / 2, which equals 1 - cos(a, b) for non-zero rows and also gives identical
    zero rows (an untrained, zero-initialised DiT's output) distance 0, where the cosine is undefined.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need (n >= 2, d) features, got shape {tuple(features.shape)}")
    unit = F.normalize(features.double(), dim=-1)  # (n, d); zero rows stay zero
    distance = torch.cdist(unit, unit).pow(2) / 2  # (n, n)
    upper = torch.triu_indices(len(unit), len(unit), offset=1)  # each unordered pair once
    return float(distance[upper[0], upper[1]].mean())


@torch.no_grad()
def sample_diversity(
    model: Blip3o,
    clip: ClipEncoder,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    steps: int | None = None,
    decoder_steps: int | None = None,
) -> dict:
    """Generate `n` images per prompt and measure their diversity (see the module docstring).

    Returns {"image": mean over prompts, "target": the same on the DiT's outputs, "per_prompt": {prompt:
    {"image", "target"}}, "distance", "n"}. Sampler settings left as None are the model's own.
    """
    if n < 2:
        raise ValueError(f"diversity needs n >= 2 samples per prompt, got {n}")
    was_training = model.training
    model.eval()
    per_prompt = {}
    try:
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed * 1000 + i)
            target = model.generate_target([prompt] * n, steps=steps, generator=generator)  # (n, C, h, w)
            images = model.decode_target(target, decoder_steps, generator=generator)
            per_prompt[prompt] = {
                "image": mean_pairwise_cosine_distance(clip_image_features(clip, images)),
                "target": mean_pairwise_cosine_distance(target.flatten(1)),
            }
    finally:
        model.train(was_training)
    return {
        "image": sum(p["image"] for p in per_prompt.values()) / len(per_prompt),
        "target": sum(p["target"] for p in per_prompt.values()) / len(per_prompt),
        "per_prompt": per_prompt,
        "distance": "mean pairwise 1 - cosine similarity (CLIP image embeddings; DiT outputs flattened)",
        "n": n,
    }
