"""Batches that carry their side inputs.

Shapes use one alphabet everywhere: B batch, R regions, Dv region feature size, L tokens.

An `ImageBatch` carries region features together with their mask, boxes and IoU adjacency, so slicing a
batch slices all of them together: `images[i0:i1].adjacency` can never come from another block.
A `TextBatch` carries token ids with their mask and the explicit caption-to-image index.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


def _slice_fields(obj, idx):
    """Return a copy of a batch dataclass with every tensor field indexed by `idx` on dim 0."""
    if isinstance(idx, int):
        idx = slice(idx, idx + 1)
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v[idx]
    return replace(obj, **changes)


def _to(obj, device=None, dtype=None):
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            if dtype is not None and v.is_floating_point():
                changes[f.name] = v.to(device=device, dtype=dtype)
            else:
                changes[f.name] = v.to(device=device)
    return replace(obj, **changes)


@dataclass(frozen=True)
class ImageBatch:
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

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, idx) -> "ImageBatch":
        return _slice_fields(self, idx)

    def to(self, device=None, dtype=None) -> "ImageBatch":
        return _to(self, device, dtype)

    @staticmethod
    def cat(batches) -> "ImageBatch":
        return _cat(ImageBatch, batches)


@dataclass(frozen=True)
class TextBatch:
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

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "TextBatch":
        return _slice_fields(self, idx)

    def to(self, device=None, dtype=None) -> "TextBatch":
        return _to(self, device, None)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) long number of real tokens."""
        return self.mask.sum(1)

    @staticmethod
    def cat(batches) -> "TextBatch":
        return _cat(TextBatch, batches)


def _cat(cls, batches):
    """Concatenate batches along B; pads the token / region axis to the longest (pad 0, mask False)."""
    batches = list(batches)
    out = {}
    for f in fields(cls):
        vals = [getattr(b, f.name) for b in batches]
        if any(v is None for v in vals):
            out[f.name] = None
            continue
        if vals[0].dim() >= 2 and f.name not in ("index", "caption_to_image"):
            n = max(v.shape[1] for v in vals)
            padded = []
            for v in vals:
                pad = n - v.shape[1]
                if pad:
                    shape = list(v.shape)
                    shape[1] = pad
                    v = torch.cat([v, v.new_zeros(shape)], 1)
                if f.name == "adjacency":  # (B, R, R): pad the last axis too
                    v = torch.nn.functional.pad(v, (0, n - v.shape[2]))
                padded.append(v)
            vals = padded
        out[f.name] = torch.cat(vals, 0)
    return cls(**out)


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
