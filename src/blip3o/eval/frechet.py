"""A Frechet distance between image sets in the project's CLIP feature space ("CLIP-FD").

Computed with torchmetrics' `FrechetInceptionDistance`, given `ClipImageFeatures` (the project's ShapesWorld
CLIP, L2-normalised image embeddings) as its feature extractor. THIS IS NOT INCEPTION-FID: the features come
from a small CLIP trained on ShapesWorld, not from Inception-v3 on ImageNet, so the numbers are comparable
only with other CLIP-FD numbers from the same CLIP, and not at all with FIDs in papers. Passing a module keeps
torchmetrics off its Inception path, which is the only one that needs torch-fidelity (not installed here).

The estimate is biased upwards for small sets (the covariances of a few hundred 128-d vectors are noisy);
compare models at equal set sizes only.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from blip3o.eval.clip_features import ClipImageFeatures, images_to_uint8
from blip3o.models.clip import ClipEncoder

FRECHET_NOTE = (
    "Frechet distance of L2-normalised embeddings of the project's ShapesWorld CLIP (torchmetrics "
    "FrechetInceptionDistance with a custom feature extractor); NOT Inception-FID"
)


@torch.no_grad()
def clip_frechet_distance(
    clip: ClipEncoder, real: list[Image.Image], fake: list[Image.Image], batch_size: int = 256
) -> float:
    """Frechet distance between the CLIP-feature Gaussians of `real` and `fake` (at least 2 images each)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"need at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    was_training = clip.training
    clip.eval()
    try:
        metric = FrechetInceptionDistance(feature=ClipImageFeatures(clip, batch_size), normalize=False)
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images_to_uint8(images[start : start + batch_size]), real=is_real)
        # Tiny negative values are round-off of identical sets (the matrix square root is approximate).
        return max(float(metric.compute()), 0.0)
    finally:
        clip.train(was_training)
