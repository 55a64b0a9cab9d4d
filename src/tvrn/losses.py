"""Ranking losses on a score matrix. They take scores, they never compute them.

scores: (B, B) float, rows images, columns captions; scores[i, i] is the score of the i-th training pair
(images[i] is the image of texts[i]). image_ids: (B,) long, the dataset image of each pair. tvrn's convention
(`exclude_same_image=True`, the default): captions of the same image in one batch are positives for each
other's images, never negatives: every (i, j) with image_ids[i] == image_ids[j] is excluded from the negatives
of both directions. With `exclude_same_image=False` (or image_ids None) only the diagonal is positive, even when
image ids repeat.

Directions:
- i2t: each image row i is a query; its positive is scores[i, i], its negatives the captions j of other images.
- t2i: each caption column j is a query; its positive is scores[j, j], its negatives the images i of other
  images' pairs.

Modes (violation v = margin + s_neg - s_pos):
- "max":       VSE++ hardest negative, sum over queries of max(0, max_neg v).
- "sum":       sum over queries and negatives of max(0, v) (VSE / SCAN without max violation).
- "smooth":    a smooth hinge per query, log(1 + sum_neg exp(v / tau)), summed over queries of both directions;
               v is not clamped (the log(1 + ...) is already a smooth hinge); tau = 0.05. It is not the TVRN
               authors' loss (that is "published": clamped, and its t2i term grouped per image row).
- "published": the loss the TVRN authors trained with, a cross-entropy over all negatives of clamped costs.
               With c_s[i, j] = max(0, margin + S[i, j] - S[i, i]) and c_im[i, j] = max(0, margin + S[i, j] -
               S[j, j]) (both 0 on the diagonal, the target logit):
                   loss = (CE(c_im / tau) + CE(c_s / tau)) / 2,   CE(X) = mean_i (log sum_j exp X[i, j] - X[i, i])
               i.e. per row log(1 + sum_{j != i} exp(max(0, v_ij) / tau)). The clamp gives every negative that
               already satisfies the margin exp(0) = 1 (a floor of log B per row, with no gradient). Both terms
               are grouped by the ROWS of their matrix: the i2t term per image query, the t2i term (c_im) per
               negative image i, summed over captions j (not per caption query). Differences from tvrn's
               convention: the /2 average of the two directions is part of the mode, and the authors treat two
               captions of the same image in one batch as negatives of each other; with exclude_same_image=True
               (tvrn's default) such entries are removed from the log-sum-exp (neither exp(0) nor anything else),
               with exclude_same_image=False the formula above holds exactly. For the authors' loss use
               mode="published", exclude_same_image=False, reduction="mean".
`reduction="sum"` (the convention of VSE++ / SCAN / SGRAF, on which lr 2e-4 is calibrated) or `"mean"` (divided
by the number of queries, B, per direction). For "published", "mean" is the formula above and "sum" sums over
rows instead of averaging (B times the "mean" value; the /2 stays).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MODES = ("max", "sum", "smooth", "published")


def positive_mask(image_ids_rows: torch.Tensor, image_ids_cols: torch.Tensor) -> torch.Tensor:
    """(B_rows,), (B_cols,) long image ids -> (B_rows, B_cols) bool, True where both come from the same image."""
    return image_ids_rows.reshape(-1, 1) == image_ids_cols.reshape(1, -1)  # (Br, Bc)


def _clamped_logsumexp(v: torch.Tensor, excluded: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row log(1 + sum over non-excluded c of exp(max(0, v[q, c]) / tau)); v, excluded (Q, C) -> (Q,)."""
    e = (v.clamp(min=0) / tau).masked_fill(excluded, float("-inf"))  # excluded: exp(.) = 0, no gradient
    return torch.logsumexp(torch.cat([v.new_zeros(v.shape[0], 1), e], 1), dim=1)  # "1 +": the target logit 0


def query_losses(scores: torch.Tensor, pos_col: torch.Tensor, excluded: torch.Tensor, margin: float = 0.2,
                 mode: str = "max", tau: float = 0.05) -> torch.Tensor:
    """One loss per query row. scores (Q, C): query q against candidates; pos_col (Q,) long: the column of q's
    positive; excluded (Q, C) bool: candidates that are not negatives of q (its positive and, under tvrn's
    convention, every candidate of the same image). Violation v = margin + s[q, c] - s[q, pos_col[q]]; "max":
    max over negatives of max(0, v), "sum": their sum, "smooth": log(1 + sum_neg exp(v / tau)), "published":
    log(1 + sum_neg exp(max(0, v) / tau)) (the i2t term of the published loss, before its /2). -> (Q,)."""
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}, expected one of {MODES}")
    pos = scores.gather(1, pos_col.reshape(-1, 1))  # (Q, 1)
    v = margin + scores - pos  # (Q, C)
    if mode == "published":
        return _clamped_logsumexp(v, excluded, tau)
    if mode == "smooth":
        e = v.masked_fill(excluded, torch.finfo(scores.dtype).min) / tau  # excluded: exp(.) = 0
        return torch.logsumexp(torch.cat([scores.new_zeros(scores.shape[0], 1), e], 1), dim=1)  # "1 +" as exp(0)
    c = v.clamp(min=0).masked_fill(excluded, 0.0)
    return c.max(dim=1).values if mode == "max" else c.sum(dim=1)


def published_image_rows(scores: torch.Tensor, pos_cols: torch.Tensor, excluded: torch.Tensor,
                         margin: float = 0.2, tau: float = 0.05) -> torch.Tensor:
    """The t2i term of the published loss, grouped by image rows (before its /2). scores (Q, C): images against
    captions; pos_cols (C,): each caption's positive score S[j, j]; excluded (Q, C) bool: the targets (image i's
    own caption) and any other excluded entries. Per image row i: log(1 + sum_j exp(max(0, margin + S[i, j] -
    S[j, j]) / tau)) over the non-excluded captions j. -> (Q,)."""
    return _clamped_logsumexp(margin + scores - pos_cols.reshape(1, -1), excluded, tau)


def contrastive_loss_parts(
    scores: torch.Tensor,
    pos: torch.Tensor,
    margin: float = 0.2,
    mode: str = "max",
    tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query losses. scores (B, B), pos (B, B) bool (True: not a negative; must include the diagonal) ->
    (i2t (B,), t2i (B,)), one value per query. For "published" both are per image ROW (the i2t term per image
    query, the t2i term per negative image i over the captions j) and neither carries the mode's /2."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be (B, B), got {tuple(scores.shape)}")
    if pos.shape != scores.shape:
        raise ValueError(f"positive mask {tuple(pos.shape)} does not match scores {tuple(scores.shape)}")
    diag = torch.arange(scores.shape[0], device=scores.device)  # query b's positive is candidate b
    if mode == "published":
        return (query_losses(scores, diag, pos, margin, mode, tau),  # c_s rows: image queries
                published_image_rows(scores, scores.diagonal(), pos, margin, tau))  # c_im rows: negative images
    return (query_losses(scores, diag, pos, margin, mode, tau),  # image rows
            query_losses(scores.t(), diag, pos.t(), margin, mode, tau))  # caption columns


def global_batch_loss_part(rows: torch.Tensor, cols: torch.Tensor, offset: int, ids_local: torch.Tensor,
                           ids_all: torch.Tensor, margin: float = 0.2, mode: str = "max", tau: float = 0.05,
                           reduction: str = "sum", exclude_same_image: bool = True,
                           positives_all: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One rank's share of the loss of the global batch (DDP with every rank's negatives).

    rows (b, N): this rank's b images against the N captions of all ranks; cols (N, b): all images against this
    rank's captions; local pair k is global pair offset + k; ids_local (b,), ids_all (N,) image ids. Returns the
    sum of the i2t losses of the local image rows and the t2i losses of the local caption columns (divided by N
    per direction for reduction="mean"): over the ranks these add up to `contrastive_loss` of the (N, N) matrix.

    "published" groups both of its terms by image rows, so this rank's share is the terms of its local image rows,
    from `rows` alone, except that the t2i term needs every caption's positive S[j, j]: positives_all (N,), the
    diagonal scores of all ranks gathered in rank order with autograd by the caller (required for this mode;
    cols is not used)."""
    b, n = rows.shape[0], ids_all.shape[0]
    pos_col = torch.arange(b, device=rows.device) + offset
    if not exclude_same_image:  # only the diagonal is positive: distinct ids per global pair
        ids_all = torch.arange(n, device=rows.device)
        ids_local = pos_col
    same = positive_mask(ids_local, ids_all)  # (b, N)
    if mode == "published":
        if positives_all is None:
            raise ValueError("the published loss under DDP needs the gathered positives: pass positives_all (N,), "
                             "every rank's diagonal scores gathered with autograd")
        if positives_all.shape != (n,):
            raise ValueError(f"positives_all must be ({n},), got {tuple(positives_all.shape)}")
        i2t = query_losses(rows, pos_col, same, margin, mode, tau)
        t2i = published_image_rows(rows, positives_all, same, margin, tau)
        total = (i2t.sum() + t2i.sum()) / 2
    else:
        i2t = query_losses(rows, pos_col, same, margin, mode, tau)
        t2i = query_losses(cols.t(), pos_col, same, margin, mode, tau)
        total = i2t.sum() + t2i.sum()
    if reduction == "mean":
        return total / n
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
    exclude_same_image: bool = True,
) -> torch.Tensor:
    """scores (B, B), image_ids (B,) or None -> scalar loss (i2t + t2i; for "published" their average).
    Only the diagonal is positive when image_ids is None or exclude_same_image is False."""
    if image_ids is None or not exclude_same_image:
        image_ids = torch.arange(scores.shape[0], device=scores.device)
    pos = positive_mask(image_ids, image_ids)  # (B, B)
    i2t, t2i = contrastive_loss_parts(scores, pos, margin=margin, mode=mode, tau=tau)
    half = 0.5 if mode == "published" else 1.0  # the published loss averages its two directions
    if reduction == "sum":
        return (i2t.sum() + t2i.sum()) * half
    if reduction == "mean":
        return (i2t.mean() + t2i.mean()) * half
    raise ValueError(f"unknown reduction {reduction!r}, expected 'sum' or 'mean'")


class ContrastiveLoss(nn.Module):
    """Bidirectional ranking loss. forward(scores (B, B), image_ids (B,) or None) -> scalar.

    margin: hinge margin (0.2, VSE++); mode: "max" (hardest negative, default), "sum", "smooth" or "published"
    (the TVRN authors' loss); tau: temperature of the smooth and published modes (0.05); reduction: "sum" over
    queries (default) or "mean"; exclude_same_image: same-image pairs are not negatives (default; False: only the
    diagonal is positive, as in the authors' code).
    """

    def __init__(self, margin: float = 0.2, mode: str = "max", tau: float = 0.05, reduction: str = "sum",
                 exclude_same_image: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown loss mode {mode!r}, expected one of {MODES}")
        self.margin, self.mode, self.tau, self.reduction = margin, mode, tau, reduction
        self.exclude_same_image = exclude_same_image

    def forward(self, scores: torch.Tensor, image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return contrastive_loss(scores, image_ids, self.margin, self.mode, self.tau, self.reduction,
                                self.exclude_same_image)

    def global_part(self, rows, cols, offset: int, ids_local, ids_all,
                    positives_all: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's share of the global batch's loss (see `global_batch_loss_part`; "published" needs
        positives_all)."""
        return global_batch_loss_part(rows, cols, offset, ids_local, ids_all, self.margin, self.mode, self.tau,
                                      self.reduction, self.exclude_same_image, positives_all)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mode={self.mode!r}, tau={self.tau}, reduction={self.reduction!r}, "
                f"exclude_same_image={self.exclude_same_image}")
