"""From split rows to padded batches with masks: no list of lengths ever reaches a model.

- `collate_images`: features (B, R, Dv) [+ boxes] -> `ImageBatch` with region mask and IoU adjacency.
- `collate_texts`: token id lists -> `TextBatch` (B, L) padded with the tokenizer's pad id, with mask.
- `PairDataset` + `collate_pairs`: training pairs, item i = caption i and its image -> `PairBatch`.
- `iter_image_batches` / `iter_text_batches`: the whole split in order, for evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .batch import ImageBatch, PairBatch, TextBatch
from .geometry import DEFAULT_ADJACENCY_THRESHOLD, adjacency
from .precomp import PrecompSplit
from .vocab import TokenizerLike

ArrayLike = Union[torch.Tensor, np.ndarray]


def _long(x) -> Optional[torch.Tensor]:
    return None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long).reshape(-1)


def collate_images(
    features: ArrayLike,
    boxes: Optional[ArrayLike] = None,
    index: Optional[Sequence[int]] = None,
    adjacency_threshold: float = DEFAULT_ADJACENCY_THRESHOLD,
    num_regions: Optional[Sequence[int]] = None,
) -> ImageBatch:
    """features (B, R, Dv), boxes (B, R, 4) or None, index (B,) image indices, num_regions (B,) real regions
    per image (default all R) -> ImageBatch.

    mask (B, R) is True for the first num_regions[b] regions; padded regions get zero features and, with
    boxes, an adjacency row and column of False (see `geometry.adjacency`); adjacency (B, R, R) is None
    without boxes. Raises `DegenerateBoxError` naming index[b] and the region for a degenerate real box.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if feats.dim() != 3:
        raise ValueError(f"features must be (B, R, Dv), got {tuple(feats.shape)}")
    b, r, _ = feats.shape
    if num_regions is None:
        mask = torch.ones(b, r, dtype=torch.bool)
    else:
        n = _long(num_regions)
        if n.shape != (b,) or bool((n < 0).any()) or bool((n > r).any()):
            raise ValueError(f"num_regions must be (B,) = ({b},) with values in 0..{r}, got {n.tolist()}")
        mask = torch.arange(r)[None, :] < n[:, None]  # (B, R)
        feats = feats * mask[..., None].to(feats.dtype)  # padded regions are exactly zero
    idx = _long(index)
    box_t = adj = None
    if boxes is not None:
        box_t = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes).float()
        if box_t.shape != (b, r, 4):
            raise ValueError(f"boxes must be (B, R, 4) = ({b}, {r}, 4), got {tuple(box_t.shape)}")
        adj = adjacency(box_t, adjacency_threshold, mask, index=None if idx is None else idx.tolist())
    return ImageBatch(features=feats, mask=mask, boxes=box_t, adjacency=adj, index=idx)


def collate_texts(
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    caption_to_image: Optional[Sequence[int]] = None,
    index: Optional[Sequence[int]] = None,
) -> TextBatch:
    """B token id lists -> TextBatch: tokens (B, L) long padded at the end with pad_id, L the longest list;
    mask (B, L) True for real tokens; caption_to_image (B,) and index (B,) as given (or None)."""
    lengths = [len(t) for t in token_lists]
    if not lengths or min(lengths) == 0:
        raise ValueError("collate_texts needs at least one caption and no empty token list")
    tokens = torch.full((len(lengths), max(lengths)), int(pad_id), dtype=torch.long)  # (B, L)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    mask = torch.arange(tokens.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    return TextBatch(tokens=tokens, mask=mask, caption_to_image=_long(caption_to_image), index=_long(index))


@dataclass(frozen=True)
class PairItem:
    """One training pair: caption `caption_index` and its image `image_index`."""

    caption_index: int
    image_index: int
    tokens: list[int]
    features: np.ndarray  # (R, Dv)
    boxes: Optional[np.ndarray]  # (R, 4) or None


def collate_pairs(
    items: Sequence[PairItem], pad_id: int, adjacency_threshold: float = DEFAULT_ADJACENCY_THRESHOLD
) -> PairBatch:
    """B PairItems -> PairBatch: images[i] is the image of texts[i]; image_ids (B,) their image indices.

    An image appears once per caption drawn, so two captions of one image give two equal image rows.
    """
    image_ids = [it.image_index for it in items]
    boxes = None if items[0].boxes is None else np.stack([it.boxes for it in items])  # (B, R, 4)
    images = collate_images(np.stack([it.features for it in items]), boxes, image_ids, adjacency_threshold)
    texts = collate_texts([it.tokens for it in items], pad_id, image_ids, [it.caption_index for it in items])
    return PairBatch(images=images, texts=texts, image_ids=_long(image_ids))


class PairDataset(Dataset):
    """Training pairs of a split: item i is caption i with its image caption_to_image[i].

    Use `DataLoader(ds, batch_size, shuffle=True, collate_fn=ds.collate)`; each item reads one feature row.
    """

    def __init__(
        self,
        split: PrecompSplit,
        tokenizer: TokenizerLike,
        adjacency_threshold: float = DEFAULT_ADJACENCY_THRESHOLD,
    ):
        self.split = split
        self.tokenizer = tokenizer
        self.adjacency_threshold = adjacency_threshold

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, i: int) -> PairItem:
        if not 0 <= i < len(self):
            raise IndexError(f"caption index {i} out of range 0..{len(self) - 1}")
        image = int(self.split.caption_to_image[i])
        boxes = self.split.boxes([image])
        return PairItem(
            caption_index=int(i),
            image_index=image,
            tokens=list(self.tokenizer.encode(self.split.captions[i])),
            features=self.split.image_features([image])[0],
            boxes=None if boxes is None else boxes[0],
        )

    def collate(self, items: Sequence[PairItem]) -> PairBatch:
        """collate_fn for a DataLoader: `collate_pairs` with this dataset's pad id and threshold."""
        return collate_pairs(items, self.tokenizer.pad_id, self.adjacency_threshold)


def iter_image_batches(
    split: PrecompSplit,
    batch_size: int,
    adjacency_threshold: float = DEFAULT_ADJACENCY_THRESHOLD,
    images: Optional[range] = None,
) -> Iterator[ImageBatch]:
    """Every image of the split (or of the range `images`) in order, batch_size at a time (the last batch may be
    smaller): ImageBatch with features (B, R, Dv), index (B,) and, with a boxes file, boxes and adjacency. One
    read per batch."""
    lo, hi = (0, split.num_images) if images is None else (images.start, images.stop)
    for start in range(lo, hi, batch_size):
        idx = np.arange(start, min(start + batch_size, hi), dtype=np.int64)
        yield collate_images(split.image_features(idx), split.boxes(idx), idx, adjacency_threshold)


def iter_text_batches(split: PrecompSplit, tokenizer: TokenizerLike, batch_size: int) -> Iterator[TextBatch]:
    """Every caption of the split in order, batch_size at a time: TextBatch with tokens (B, L), mask,
    caption_to_image (B,) and index (B,) = caption indices."""
    for start in range(0, split.num_captions, batch_size):
        stop = min(start + batch_size, split.num_captions)
        tokens = [tokenizer.encode(c) for c in split.captions[start:stop]]
        yield collate_texts(tokens, tokenizer.pad_id, split.caption_to_image[start:stop], np.arange(start, stop))
