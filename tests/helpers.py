"""Plain helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import torch


def iou_adjacency(boxes: torch.Tensor, thr: float = 0.2) -> torch.Tensor:
    """(B, R, 4) boxes x1, y1, x2, y2 -> (B, R, R) bool, IoU >= thr (written out, independent of tvrn.data)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    iw = (torch.minimum(x2[:, :, None], x2[:, None]) - torch.maximum(x1[:, :, None], x1[:, None])).clamp_min(0)
    ih = (torch.minimum(y2[:, :, None], y2[:, None]) - torch.maximum(y1[:, :, None], y1[:, None])).clamp_min(0)
    inter = iw * ih
    return inter / (area[:, :, None] + area[:, None] - inter) >= thr


def pad_token_lists(caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as 1-D token tensors -> tokens (N, Lmax) long, zero-padded, and mask (N, Lmax) bool."""
    lmax = max(len(c) for c in caps)
    tokens = torch.zeros(len(caps), lmax, dtype=torch.long)
    for i, c in enumerate(caps):
        tokens[i, :len(c)] = c
    mask = torch.arange(lmax)[None] < torch.tensor([len(c) for c in caps])[:, None]
    return tokens, mask
