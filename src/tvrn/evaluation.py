"""Evaluation: a model's all-pairs scores of a split (`encode_split`, `score_split`, split across ranks under
torchrun), the protocols on a score matrix, ensembles and saved score matrices.

scores: (Ni, Nt) float, rows images, columns captions; caption_to_image: (Nt,) long.

Protocols (README "Protocols"):
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

import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

from torch import nn

from .data import PrecompSplit, iter_image_batches, iter_text_batches
from .distributed import all_reduce_sum_, dist_info
from .fileio import atomic_write
from .metrics import METRIC_NAMES, retrieval_metrics
from .scoring import encode_images, encode_texts, score_all

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
    folds = [(rows, caps, scores[rows][:, caps]) for rows, caps in fold_indices(c2i, scores.shape[0], n_folds)]
    out = evaluate_folds(folds, c2i)
    out["protocol"] = protocol
    return out


def evaluate_folds(folds: Sequence[tuple[slice, torch.Tensor, torch.Tensor]],
                   caption_to_image: torch.Tensor) -> dict[str, Any]:
    """Metrics of each fold and their mean -> {metric: mean over folds, ..., "folds": [dict per fold]}.

    folds: [(image slice, caption indices (n_k,) long, scores (Ni/F, n_k))], as `fold_indices` and `score_folds`
    give them; caption_to_image: (Nt,) of the whole split."""
    c2i = torch.as_tensor(caption_to_image).long().reshape(-1)
    per_fold = [evaluate(sub, c2i[caps] - rows.start) for rows, caps, sub in folds]
    out: dict[str, Any] = {k: float(np.mean([f[k] for f in per_fold])) for k in METRIC_NAMES}
    out["folds"] = per_fold
    return out


def score_folds(model: nn.Module, enc_images: Any, enc_texts: Any, caption_to_image: torch.Tensor, n_folds: int,
                **score_kw) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Score only the pairs inside each fold (COCO 1K's consecutive-image folds, `fold_indices`): a 1/n_folds
    share of all pairs -> [(image slice, caption indices (n_k,) long, scores (Ni/F, n_k) float32)].

    enc_images: EncodedImages (Ni), enc_texts: EncodedTexts (Nt) of the whole split (`encode_split`); score_kw go to
    `score_all` (block sizes, device, ...). `evaluate_folds` of the result equals `evaluate_protocol(scores,
    c2i, "coco_1k", n_folds)` of the full matrix up to the scorer's rounding (tests/test_demo.py)."""
    out = []
    for rows, caps in fold_indices(caption_to_image, len(enc_images), n_folds):
        out.append((rows, caps, score_all(model, enc_images[rows], enc_texts[caps], **score_kw)))
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


@torch.no_grad()
def encode_split(model: nn.Module, split: PrecompSplit, tokenizer, data: dict, device=None, progress: bool = False):
    """Per-image and per-caption work of a split -> (EncodedImages (N_img), EncodedTexts (N_caps))."""
    bs = int(data.get("eval_batch_size", 128))
    thr = float(data.get("adjacency_threshold", 0.2))
    enc_i = encode_images(model, iter_image_batches(split, bs, adjacency_threshold=thr), device=device,
                          progress=progress)
    enc_t = encode_texts(model, iter_text_batches(split, tokenizer, bs), device=device, progress=progress)
    return enc_i, enc_t


def block_sizes(data: dict) -> dict[str, int]:
    """The scorer's block sizes from a run's data config -> {"block_images", "block_texts"} for `score_all`."""
    return {"block_images": int(data.get("block_images", 128)), "block_texts": int(data.get("block_texts", 512))}


@torch.no_grad()
def score_split(model: nn.Module, split: PrecompSplit, tokenizer, data: dict, device=None,
                progress: bool = False, encoded=None) -> torch.Tensor:
    """All-pairs scores of a split -> (N_img, N_caps) float32 on the CPU, through the one scorer.
    encoded: (enc_i, enc_t) from `encode_split` if already computed.

    Under torch.distributed (world > 1) the work is split across the ranks: each rank encodes the split (or takes
    `encoded`), scores its share of the scorer's block plan (`score_all(shard=...)`: contiguous, cost-balanced
    (caption block, image chunk) units of the whole gallery's plan), and the zero-padded shards are summed, so
    every rank gets the single-process matrix bit for bit (collective: every rank must call it;
    tests/test_distributed.py)."""
    info = dist_info()
    kw = dict(**block_sizes(data), device=device, progress=progress and info.is_main)
    enc_i, enc_t = encoded or encode_split(model, split, tokenizer, data, device=device, progress=kw["progress"])
    if info.enabled:
        return all_reduce_sum_(score_all(model, enc_i, enc_t, shard=(info.rank, info.world_size), **kw))
    return score_all(model, enc_i, enc_t, **kw)
