"""Evaluation protocols on a score matrix, ensembles, saved score matrices and result files.

scores: (Ni, Nt) float, rows images, columns captions; caption_to_image: (Nt,) long.

Protocols (DESIGN 6):
- "f30k_1k": Flickr30K test split as is (1000 images x 5000 captions), all pairs.
- "coco_1k": COCO testall in 5 folds of 1000 consecutive images with their captions (1000 x 5000); metrics
             are the mean over folds; the per-fold metrics are returned under "folds".
- "coco_5k": COCO testall, all 5000 images x 25000 captions.
- "all":     all pairs of whatever split is given.
`evaluate_protocol` does not enforce the split sizes (small splits work the same way from Python, with
n_folds); coco_1k needs Ni divisible by the number of folds. Fold k holds images [k * Ni/F, (k+1) * Ni/F) and
every caption whose image is in it. `tvrn eval` (`check_protocol_split`) refuses coco_1k unless its folds hold
COCO_1K_FOLD_IMAGES images (Ni = 5000): smaller folds rank each query among fewer candidates and inflate recall.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .fileio import atomic_write
from .metrics import METRIC_NAMES, retrieval_metrics

PROTOCOLS = ("f30k_1k", "coco_1k", "coco_5k", "all")
COCO_1K_FOLDS, COCO_1K_FOLD_IMAGES = 5, 1000  # coco_1k: 5 folds of 1000 images (COCO testall, 5000 images)


def check_protocol_split(protocol: str, n_images: int, where: str = "the split") -> None:
    """Refuse coco_1k on a split that does not make COCO_1K_FOLDS folds of COCO_1K_FOLD_IMAGES images (ValueError
    naming `where` and its size): 5 folds of a small split rank each query among a fifth of it, and their
    recall is not comparable with anything (use "all" on such a split)."""
    want = COCO_1K_FOLDS * COCO_1K_FOLD_IMAGES
    if protocol == "coco_1k" and n_images != want:
        raise ValueError(f"protocol coco_1k scores {COCO_1K_FOLDS} folds of {COCO_1K_FOLD_IMAGES} images (COCO "
                         f"testall, {want} images), but {where} has {n_images} images: its folds would hold "
                         f"{n_images / COCO_1K_FOLDS:g} images each, and recall over so few candidates is not the "
                         f"1K protocol's; use --protocol all (all pairs of the split)")


def evaluate(scores: torch.Tensor, caption_to_image: torch.Tensor) -> dict[str, float]:
    """(Ni, Nt), (Nt,) -> {i2t/R@1, ..., t2i/meanr, rsum} on all pairs."""
    return retrieval_metrics(torch.as_tensor(scores), torch.as_tensor(caption_to_image))


def fold_indices(caption_to_image: torch.Tensor, n_images: int, n_folds: int) -> list[tuple[slice, torch.Tensor]]:
    """Split into n_folds folds of consecutive images -> [(image slice, caption indices (n,) long)] per fold."""
    if n_images % n_folds:
        raise ValueError(f"{n_images} images cannot be split into {n_folds} equal folds")
    size = n_images // n_folds
    c2i = torch.as_tensor(caption_to_image).long().reshape(-1)
    out = []
    for k in range(n_folds):
        i0, i1 = k * size, (k + 1) * size
        caps = torch.nonzero((c2i >= i0) & (c2i < i1)).reshape(-1)  # (n,)
        out.append((slice(i0, i1), caps))
    return out


def evaluate_protocol(
    scores: torch.Tensor, caption_to_image: torch.Tensor, protocol: str, n_folds: int = 5
) -> dict[str, Any]:
    """Metrics under a named protocol -> {metric: float, ..., "protocol": str[, "folds": [dict per fold]]}."""
    scores = torch.as_tensor(scores)
    c2i = torch.as_tensor(caption_to_image).long().reshape(-1)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}, expected one of {PROTOCOLS}")
    if protocol != "coco_1k":
        out: dict[str, Any] = dict(evaluate(scores, c2i))
        out["protocol"] = protocol
        return out
    folds = []
    for rows, caps in fold_indices(c2i, scores.shape[0], n_folds):
        sub = scores[rows][:, caps]  # (Ni/F, n_k)
        folds.append(evaluate(sub, c2i[caps] - rows.start))
    out = {k: float(np.mean([f[k] for f in folds])) for k in METRIC_NAMES}
    out["protocol"] = protocol
    out["folds"] = folds
    return out


def ensemble(score_matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average score matrices of several models: [(Ni, Nt), ...] -> (Ni, Nt) float32."""
    mats = [torch.as_tensor(s).float() for s in score_matrices]
    if not mats:
        raise ValueError("ensemble of no score matrices")
    for k, m in enumerate(mats[1:], 1):
        if m.shape != mats[0].shape:
            raise ValueError(f"score matrix {k} has shape {tuple(m.shape)}, matrix 0 has {tuple(mats[0].shape)}")
    return torch.stack(mats).mean(0)


def load_scores(path: str | os.PathLike, expected_shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Load a saved (Ni, Nt) score matrix from .npy -> float32 tensor; ValueError naming the file on a bad shape."""
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-d (images, captions) score matrix, got shape {arr.shape}")
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise ValueError(
            f"{path}: score matrix has shape {tuple(arr.shape)}, expected {tuple(expected_shape)} (images, captions)"
        )
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def save_scores(path: str | os.PathLike, scores: torch.Tensor) -> None:
    """Write a score matrix to .npy atomically (temp file + os.replace)."""
    arr = torch.as_tensor(scores).detach().float().cpu().numpy()
    atomic_write(path, lambda f: np.save(f, arr))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON document atomically (temp file + os.replace), so a reader never sees half a file."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))
