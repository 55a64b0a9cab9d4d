"""Retrieval metrics from a score matrix: ranks, recall@K, median / mean rank, RSUM.

scores: (Ni, Nt) float, rows images, columns captions. caption_to_image: (Nt,) long, the image of each caption.

Ranks are 1-based. Ties count against the ground truth (pessimistic and deterministic, independent of the
order of the gallery):

    rank = 1 + number of NEGATIVE candidates whose score is >= the ground-truth score

- text-to-image (per caption c): the ground truth is the score of c's image; candidates are the other images.
- image-to-text (per image i): the ground truth is the best score among i's captions (the rank of the first of
  its captions in the sorted list); candidates are the captions of other images. The image's other captions
  never count against it.

The usual argsort-based code (SCAN, VSE++) breaks ties by position, so its numbers depend on the gallery order;
on real-valued scores ties are rare and both definitions agree.

Metric names are stable: `i2t/R@1`, `i2t/R@5`, `i2t/R@10`, `i2t/medr`, `i2t/meanr`, the same with `t2i/`, and
`rsum` (sum of the six recalls, in percent). medr is floor(median of ranks) (numpy's median, as in the
reference code, where an even count averages the two middle ranks), meanr the mean rank.
All computations are vectorised and chunked over rows / columns, so a 5000 x 25000 matrix needs only the
matrix itself plus one chunk of comparisons.
"""
from __future__ import annotations

import math

import torch

RECALL_KS = (1, 5, 10)
METRIC_NAMES = tuple(
    [f"{d}/{m}" for d in ("i2t", "t2i") for m in ("R@1", "R@5", "R@10", "medr", "meanr")] + ["rsum"]
)


def _check(scores: torch.Tensor, caption_to_image: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (Ni, Nt), got {tuple(scores.shape)}")
    c2i = torch.as_tensor(caption_to_image, device=scores.device).long().reshape(-1)
    if c2i.numel() != scores.shape[1]:
        raise ValueError(f"caption_to_image has {c2i.numel()} entries but scores have {scores.shape[1]} captions")
    if c2i.numel() and (c2i.min() < 0 or c2i.max() >= scores.shape[0]):
        raise ValueError(f"caption_to_image refers to images outside [0, {scores.shape[0]})")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return c2i


def _chunk(n_other: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(1, n_other))


def t2i_ranks(scores: torch.Tensor, caption_to_image: torch.Tensor, chunk_elems: int = 2**24) -> torch.Tensor:
    """(Ni, Nt), (Nt,) -> (Nt,) long 1-based rank of each caption's image among all images (ties count against)."""
    c2i = _check(scores, caption_to_image)
    ni, nt = scores.shape
    gt = scores.gather(0, c2i.reshape(1, -1)).reshape(-1)  # (Nt,) score of each caption with its image
    ranks = torch.empty(nt, dtype=torch.long, device=scores.device)
    step = _chunk(ni, chunk_elems)
    for c0 in range(0, nt, step):
        c1 = min(nt, c0 + step)
        block = scores[:, c0:c1]  # (Ni, n)
        ge = block >= gt[c0:c1].reshape(1, -1)  # (Ni, n), includes the ground truth itself
        ranks[c0:c1] = ge.sum(0)  # = 1 + #negatives >= gt
    return ranks


def i2t_ranks(scores: torch.Tensor, caption_to_image: torch.Tensor, chunk_elems: int = 2**24) -> torch.Tensor:
    """(Ni, Nt), (Nt,) -> (Ni,) long 1-based rank of each image's best caption among all captions.

    Ties count against; the image's own captions never do. Raises if an image has no caption.
    """
    c2i = _check(scores, caption_to_image)
    ni, nt = scores.shape
    own = scores.gather(0, c2i.reshape(1, -1)).reshape(-1)  # (Nt,) each caption's score with its own image
    best = torch.full((ni,), -math.inf, dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, c2i, own, reduce="amax")  # (Ni,) best positive per image
    n_caps = torch.bincount(c2i, minlength=ni)
    if (n_caps == 0).any():
        missing = torch.nonzero(n_caps == 0).reshape(-1)[:5].tolist()
        raise ValueError(f"images without any caption (for example {missing}): image-to-text rank undefined")
    ranks = torch.empty(ni, dtype=torch.long, device=scores.device)
    step = _chunk(nt, chunk_elems)
    for i0 in range(0, ni, step):
        i1 = min(ni, i0 + step)
        block = scores[i0:i1]  # (n, Nt)
        rows = torch.arange(i0, i1, device=scores.device).reshape(-1, 1)  # (n, 1)
        neg = c2i.reshape(1, -1) != rows  # (n, Nt) True for captions of other images
        ge = (block >= best[i0:i1].reshape(-1, 1)) & neg  # (n, Nt)
        ranks[i0:i1] = 1 + ge.sum(1)
    return ranks


def rank_metrics(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """(N,) 1-based ranks -> {prefix/R@1, R@5, R@10 (percent), prefix/medr, prefix/meanr}."""
    r = ranks.double().cpu()
    out = {f"{prefix}/R@{k}": 100.0 * (r <= k).double().mean().item() for k in RECALL_KS}
    out[f"{prefix}/medr"] = float(math.floor(_np_median(r)))
    out[f"{prefix}/meanr"] = r.mean().item()
    return out


def _np_median(r: torch.Tensor) -> float:
    """numpy-style median (mean of the two middle values for an even count)."""
    s = torch.sort(r).values
    n = s.numel()
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def retrieval_metrics(scores: torch.Tensor, caption_to_image: torch.Tensor) -> dict[str, float]:
    """(Ni, Nt) scores, (Nt,) caption_to_image -> dict with the METRIC_NAMES keys (floats)."""
    out = rank_metrics(i2t_ranks(scores, caption_to_image), "i2t")
    out.update(rank_metrics(t2i_ranks(scores, caption_to_image), "t2i"))
    out["rsum"] = sum(out[f"{d}/R@{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return {k: out[k] for k in METRIC_NAMES}
