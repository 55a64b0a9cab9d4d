"""Region box geometry: box checks, pairwise IoU and the spatial adjacency used by TVRN's spatial context.

Boxes are x1, y1, x2, y2 in pixels. A box with x2 < x1 or y2 < y1 is degenerate and rejected; a zero-area
box (x2 == x1 or y2 == y1) is allowed: its IoU with every box, itself included, is 0, and it is still
adjacent to itself.

Padded regions (mask False): adjacent to nothing, not even themselves, so a row or column of a padded region
in the adjacency is all False. Attention over adjacency must therefore only be read for real regions (the
model masks padded query rows anyway); this keeps "A[j, k] True" meaning "both j and k are real regions".
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .errors import DegenerateBoxError

ArrayLike = Union[torch.Tensor, np.ndarray]

DEFAULT_ADJACENCY_THRESHOLD = 0.2  # IoU threshold of the official TVRN script


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.float()


def check_boxes(
    boxes: ArrayLike,
    mask: Optional[ArrayLike] = None,
    index: Optional[Sequence[int]] = None,
    file: Optional[str] = None,
) -> None:
    """Raise `DegenerateBoxError` for the first real region with non-finite coordinates, x2 < x1 or y2 < y1.

    boxes (B, R, 4) or (R, 4); mask (B, R) bool, padded regions are not checked; index (B,) the images'
    indices in their split, used in the error message (default 0..B-1); file names the source in the message.
    """
    b = _as_float_tensor(boxes)
    single = b.dim() == 2
    if single:
        b = b[None]
    if b.dim() != 3 or b.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, R, 4) or (R, 4), got {tuple(b.shape)}")
    bad = ~torch.isfinite(b).all(-1) | (b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1])  # (B, R)
    if mask is not None:
        m = torch.as_tensor(mask, dtype=torch.bool, device=b.device)
        bad &= m[None] if single else m
    if bool(bad.any()):
        i, r = (int(v) for v in bad.nonzero()[0])
        image = int(index[i]) if index is not None else i
        raise DegenerateBoxError(image, r, b[i, r].tolist(), file)


def iou_matrix(boxes: ArrayLike) -> torch.Tensor:
    """Pairwise IoU of boxes (..., R, 4) x1, y1, x2, y2 -> (..., R, R) float.

    Pairs whose union has zero area (two zero-area boxes) get IoU 0. Boxes are not checked here; see
    `check_boxes` (degenerate boxes would give meaningless values).
    """
    b = _as_float_tensor(boxes)
    x1, y1, x2, y2 = b.unbind(-1)  # each (..., R)
    area = (x2 - x1) * (y2 - y1)  # (..., R)
    iw = (torch.minimum(x2[..., :, None], x2[..., None, :]) - torch.maximum(x1[..., :, None], x1[..., None, :]))
    ih = (torch.minimum(y2[..., :, None], y2[..., None, :]) - torch.maximum(y1[..., :, None], y1[..., None, :]))
    inter = iw.clamp(min=0) * ih.clamp(min=0)  # (..., R, R)
    union = area[..., :, None] + area[..., None, :] - inter  # (..., R, R)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(b.dtype).tiny), torch.zeros_like(inter))


def adjacency(
    boxes: ArrayLike,
    threshold: float = DEFAULT_ADJACENCY_THRESHOLD,
    mask: Optional[ArrayLike] = None,
    index: Optional[Sequence[int]] = None,
    file: Optional[str] = None,
) -> torch.Tensor:
    """Spatial adjacency of regions: boxes (B, R, 4) [or (R, 4)], mask (B, R) bool -> (B, R, R) bool.

    A[j, k] = IoU(box j, box k) >= threshold; the diagonal is True for every real region (also zero-area
    ones); a padded region (mask False) is adjacent to nothing, not even itself. Raises
    `DegenerateBoxError` (naming image `index[b]`, the region and `file`) for a degenerate real box.
    """
    b = _as_float_tensor(boxes)
    check_boxes(b, mask, index, file)
    r = b.shape[-2]
    adj = iou_matrix(b) >= threshold  # (..., R, R)
    adj |= torch.eye(r, dtype=torch.bool, device=b.device)
    if mask is not None:
        m = torch.as_tensor(mask, dtype=torch.bool, device=b.device)  # (..., R)
        adj &= m[..., :, None] & m[..., None, :]
    return adj
