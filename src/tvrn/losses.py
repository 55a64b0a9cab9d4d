"""Ranking losses on a score matrix. They take scores, they never compute them.

scores: (B, B) float, rows images, columns captions; scores[i, i] is the score of the i-th training pair
(images[i] is the image of texts[i]). image_ids: (B,) long, the dataset image of each pair. Captions of the
same image in one batch are positives for each other's images, never negatives: every (i, j) with
image_ids[i] == image_ids[j] is excluded from the negatives of both directions.

Directions:
- i2t: each image row i is a query; its positive is scores[i, i], its negatives the captions j of other images.
- t2i: each caption column j is a query; its positive is scores[j, j], its negatives the images i of other
  images' pairs.

Modes (violation v = margin + s_neg - s_pos):
- "max":    VSE++ hardest negative, sum over queries of max(0, max_neg v).
- "sum":    sum over queries and negatives of max(0, v) (VSE / SCAN without max violation).
- "smooth": the official TVRN code's smooth variant, per query log(1 + sum_neg exp(v / tau)), summed over
            queries; v is not clamped (the log(1 + ...) is already a smooth hinge); tau = 0.05.
Both directions are added. `reduction="sum"` (the convention of VSE++ / SCAN / SGRAF, on which lr 2e-4 is
calibrated) or `"mean"` (divided by the number of queries, B, per direction).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MODES = ("max", "sum", "smooth")


def positive_mask(image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor) -> torch.Tensor:
    """(B_rows,), (B_cols,) long image ids -> (B_rows, B_cols) bool, True where both come from the same image."""
    return image_ids_rows.reshape(-1, 1) == image_ids_cols.reshape(1, -1)  # (Br, Bc)


def _violations(scores: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (v_i2t, v_t2i), both (B, B): margin + s_neg - s_pos, for row queries and for column queries."""
    diag = scores.diagonal()  # (B,) positive pair scores
    v_i2t = margin + scores - diag.reshape(-1, 1)  # (B, B): row i query, column j candidate caption
    v_t2i = margin + scores - diag.reshape(1, -1)  # (B, B): column j query, row i candidate image
    return v_i2t, v_t2i


def contrastive_loss_parts(
    scores: torch.Tensor,
    pos: torch.Tensor,
    margin: float = 0.2,
    mode: str = "max",
    tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query losses. scores (B, B), pos (B, B) bool -> (i2t (B,), t2i (B,)), one value per query."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be (B, B), got {tuple(scores.shape)}")
    if pos.shape != scores.shape:
        raise ValueError(f"positive mask {tuple(pos.shape)} does not match scores {tuple(scores.shape)}")
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}, expected one of {MODES}")
    v_i2t, v_t2i = _violations(scores, margin)
    if mode == "smooth":
        neg_inf = torch.finfo(scores.dtype).min
        e_i2t = v_i2t.masked_fill(pos, neg_inf) / tau  # (B, B) positives get exp(.) = 0
        e_t2i = v_t2i.masked_fill(pos, neg_inf) / tau
        zero = scores.new_zeros(scores.shape[0], 1)  # the "1 +" term as exp(0)
        i2t = torch.logsumexp(torch.cat([zero, e_i2t], 1), dim=1)  # (B,) per image row
        t2i = torch.logsumexp(torch.cat([zero, e_t2i.t()], 1), dim=1)  # (B,) per caption column
        return i2t, t2i
    c_i2t = v_i2t.clamp(min=0).masked_fill(pos, 0.0)  # (B, B)
    c_t2i = v_t2i.clamp(min=0).masked_fill(pos, 0.0)
    if mode == "max":
        return c_i2t.max(dim=1).values, c_t2i.max(dim=0).values
    return c_i2t.sum(dim=1), c_t2i.sum(dim=0)


def contrastive_loss(
    scores: torch.Tensor,
    image_ids: Optional[torch.Tensor] = None,
    margin: float = 0.2,
    mode: str = "max",
    tau: float = 0.05,
    reduction: str = "sum",
) -> torch.Tensor:
    """scores (B, B), image_ids (B,) or None (then only the diagonal is positive) -> scalar loss (i2t + t2i)."""
    if image_ids is None:
        image_ids = torch.arange(scores.shape[0], device=scores.device)
    pos = positive_mask(image_ids, image_ids)  # (B, B)
    i2t, t2i = contrastive_loss_parts(scores, pos, margin=margin, mode=mode, tau=tau)
    if reduction == "sum":
        return i2t.sum() + t2i.sum()
    if reduction == "mean":
        return i2t.mean() + t2i.mean()
    raise ValueError(f"unknown reduction {reduction!r}, expected 'sum' or 'mean'")


class ContrastiveLoss(nn.Module):
    """Bidirectional ranking loss. forward(scores (B, B), image_ids (B,) or None) -> scalar.

    margin: hinge margin (0.2, VSE++); mode: "max" (hardest negative, default), "sum" or "smooth";
    tau: temperature of the smooth mode (0.05); reduction: "sum" over queries (default) or "mean".
    """

    def __init__(self, margin: float = 0.2, mode: str = "max", tau: float = 0.05, reduction: str = "sum") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown loss mode {mode!r}, expected one of {MODES}")
        self.margin, self.mode, self.tau, self.reduction = margin, mode, tau, reduction

    def forward(self, scores: torch.Tensor, image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return contrastive_loss(scores, image_ids, self.margin, self.mode, self.tau, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mode={self.mode!r}, tau={self.tau}, reduction={self.reduction!r}"
