"""Batches that carry their side inputs.

Shapes use one alphabet everywhere: B batch, R regions, Dv region feature size, L tokens.

An `ImageBatch` carries region features together with their mask, boxes and IoU adjacency, so slicing a
batch slices all of them together: `images[i0:i1].adjacency` can never come from another block.
A `TextBatch` carries token ids with their mask and the explicit caption-to-image index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..tensors import TensorFields


@dataclass(frozen=True)
class ImageBatch(TensorFields):
    """Region features of B images.

    features:  (B, R, Dv) float
    mask:      (B, R) bool, True for real regions (padded regions where R varies are False)
    boxes:     (B, R, 4) float x1, y1, x2, y2 in pixels, or None
    adjacency: (B, R, R) bool IoU adjacency (diagonal True for real regions), or None
    index:     (B,) long, the images' indices in their dataset split
    """

    features: torch.Tensor
    mask: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    adjacency: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TextBatch(TensorFields):
    """Token ids of B captions (vocabulary ids for the GRU encoder, word-piece ids for BERT).

    tokens:           (B, L) long, padded with the tokenizer's pad id at the end
    mask:             (B, L) bool, True for real tokens
    caption_to_image: (B,) long, index of each caption's image in its split (ground truth), or None
    index:            (B,) long, the captions' indices in their split, or None
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    caption_to_image: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) long number of real tokens."""
        return self.mask.sum(1)


@dataclass(frozen=True)
class PairBatch:
    """A training batch of B (image, caption) pairs: images[i] is the image of texts[i].

    image_ids: (B,) long, dataset image index of each pair; captions with equal ids are positives
    for each other's images, never negatives.
    """

    images: ImageBatch
    texts: TextBatch
    image_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device=None, dtype=None) -> "PairBatch":
        return PairBatch(self.images.to(device, dtype), self.texts.to(device), self.image_ids.to(device))
