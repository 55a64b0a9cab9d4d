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


def query_losses(scores: torch.Tensor, pos_col: torch.Tensor, excluded: torch.Tensor, margin: float = 0.2,
                 mode: str = "max", tau: float = 0.05) -> torch.Tensor:
    """One loss per query row. scores (Q, C): query q against candidates; pos_col (Q,) long: the column of q's
    positive; excluded (Q, C) bool: candidates that are not negatives of q (its positive and every candidate of
    the same image). Violation v = margin + s[q, c] - s[q, pos_col[q]]; "max": max over negatives of max(0, v),
    "sum": their sum, "smooth": log(1 + sum_neg exp(v / tau)). -> (Q,)."""
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}, expected one of {MODES}")
    pos = scores.gather(1, pos_col.reshape(-1, 1))  # (Q, 1)
    v = margin + scores - pos  # (Q, C)
    if mode == "smooth":
        e = v.masked_fill(excluded, torch.finfo(scores.dtype).min) / tau  # excluded: exp(.) = 0
        return torch.logsumexp(torch.cat([scores.new_zeros(scores.shape[0], 1), e], 1), dim=1)  # "1 +" as exp(0)
    c = v.clamp(min=0).masked_fill(excluded, 0.0)
    return c.max(dim=1).values if mode == "max" else c.sum(dim=1)


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
    diag = torch.arange(scores.shape[0], device=scores.device)  # query b's positive is candidate b
    return (query_losses(scores, diag, pos, margin, mode, tau),  # image rows
            query_losses(scores.t(), diag, pos.t(), margin, mode, tau))  # caption columns


def global_batch_loss_part(rows: torch.Tensor, cols: torch.Tensor, offset: int, ids_local: torch.Tensor,
                           ids_all: torch.Tensor, margin: float = 0.2, mode: str = "max", tau: float = 0.05,
                           reduction: str = "sum") -> torch.Tensor:
    """One rank's share of the loss of the global batch (DDP with every rank's negatives).

    rows (b, N): this rank's b images against the N captions of all ranks; cols (N, b): all images against this
    rank's captions; local pair k is global pair offset + k; ids_local (b,), ids_all (N,) image ids. Returns the
    sum of the i2t losses of the local image rows and the t2i losses of the local caption columns (divided by N
    per direction for reduction="mean"): over the ranks these add up to `contrastive_loss` of the (N, N) matrix."""
    b = rows.shape[0]
    pos_col = torch.arange(b, device=rows.device) + offset
    same = positive_mask(ids_local, ids_all)  # (b, N)
    i2t = query_losses(rows, pos_col, same, margin, mode, tau)
    t2i = query_losses(cols.t(), pos_col, same, margin, mode, tau)
    total = i2t.sum() + t2i.sum()
    if reduction == "mean":
        return total / ids_all.shape[0]
    if reduction != "sum":
        raise ValueError(f"unknown reduction {reduction!r}, expected 'sum' or 'mean'")
    return total


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

    def global_part(self, rows, cols, offset: int, ids_local, ids_all) -> torch.Tensor:
        """This rank's share of the global batch's loss (see `global_batch_loss_part`)."""
        return global_batch_loss_part(rows, cols, offset, ids_local, ids_all, self.margin, self.mode, self.tau,
                                      self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mode={self.mode!r}, tau={self.tau}, reduction={self.reduction!r}"
