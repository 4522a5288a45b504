"""The project's CLIP as a measuring instrument: one image-feature definition shared by the sample-diversity,
Frechet-distance and CLIP-score metrics of the design study.

Feature: CLIP's projected image embedding (the vector its contrastive loss compares with caption embeddings),
L2-normalised. It is the project's own CLIP, trained on ShapesWorld, not OpenAI CLIP and not Inception-v3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blip3o.models.clip import ClipEncoder

if TYPE_CHECKING:
    from blip3o.models.blip3o import Blip3o


def images_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8, the input torchmetrics' Frechet metric passes to its extractor."""
    batch = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])  # (N, H, W, 3)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


class ClipImageFeatures(nn.Module):
    """uint8 images (N, 3, H, W) -> L2-normalised CLIP image embeddings (N, projection_dim), no gradients.

    `num_features` tells torchmetrics the output width, so it does not probe the module with a 299x299 dummy
    image (Inception's input size).
    """

    def __init__(self, clip: ClipEncoder, batch_size: int = 256):
        super().__init__()
        self.clip = clip
        self.batch_size = batch_size
        self.num_features = clip.config.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
        device = self.clip.pixel_mean.device
        size = self.clip.config.image_size
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = (
                images[start : start + self.batch_size].to(device).float() / 255.0
            )  # (b, 3, H, W) in [0, 1]
            if chunk.shape[-2:] != (size, size):
                chunk = F.interpolate(chunk, size=(size, size), mode="bicubic", align_corners=False).clamp(
                    0, 1
                )
            embedding = self.clip.image_embeddings(self.clip.normalize_pixels(chunk))  # (b, projection_dim)
            out.append(F.normalize(embedding.float(), dim=-1))
        return torch.cat(out)  # (N, projection_dim)


def clip_image_features(clip: ClipEncoder, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, projection_dim) L2-normalised CLIP image embeddings."""
    was_training = clip.training
    clip.eval()
    try:
        return ClipImageFeatures(clip)(images_to_uint8(images))
    finally:
        clip.train(was_training)


@torch.no_grad()
def clip_text_features(model: Blip3o, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Captions -> (N, projection_dim) L2-normalised CLIP text embeddings (the model's tokenizer and CLIP)."""
    out = []
    for start in range(0, len(captions), batch_size):
        text = model.clip_text_inputs(captions[start : start + batch_size])
        embedding = model.clip.text_embeddings(text["input_ids"], text["attention_mask"])  # (b, P)
        out.append(F.normalize(embedding.float(), dim=-1))
    return torch.cat(out)  # (N, projection_dim)


def clip_score(model: Blip3o, images: list[Image.Image], prompts: list[str]) -> dict:
    """Prompt alignment as CLIP sees it: the cosine similarity of each image's embedding with its prompt's,
    with the project's ShapesWorld CLIP (a continuous companion to the judge's pass/fail GenEval).

    Returns {"mean", "std" (over images, ddof=1), "n"}.
    """
    if len(images) != len(prompts) or len(images) < 2:
        raise ValueError(f"need >= 2 images with one prompt each, got {len(images)} and {len(prompts)}")
    was_training = model.clip.training
    model.clip.eval()
    try:
        image = clip_image_features(model.clip, images)  # (N, P)
        text = clip_text_features(model, prompts)  # (N, P)
    finally:
        model.clip.train(was_training)
    cosine = (image * text).sum(dim=-1).double()  # (N,)
    return {"mean": float(cosine.mean()), "std": float(cosine.std()), "n": len(images)}
