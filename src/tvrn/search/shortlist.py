"""Shortlist + re-rank.

Stage 1: every model offers pair-independent unit vectors `shortlist_embed_image(enc_i)` (Ni, D) and
`shortlist_embed_text(enc_t)` (Nt, D) (TVRN / SGRAF: the global IR g and a TextSA vector pooled from the content
words, trained with `TrainConfig.shortlist_loss_weight`); their cosines pick, for each caption, its top k_images
images (text-to-image) and, for each image, its top k_texts captions (image-to-text).
Stage 2: the union of shortlisted pairs is scored once with the full `model.score`; each direction ranks only its
own shortlist. Scores outside a query's shortlist are -inf, so with `tvrn.metrics` (ties count against the
ground truth) a ground truth outside the shortlist ranks behind every candidate: a miss at every K < gallery
size, never rank 1.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..evaluation import evaluate
from ..scoring.encode import eval_mode, model_device
from ..scoring.plan import trim_lengths


def shortlist_embeddings(model, enc_images, enc_texts) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image vectors (Ni, D), caption vectors (Nt, D), float32 on CPU."""
    with torch.no_grad():
        return (model.shortlist_embed_image(enc_images).float().cpu(),
                model.shortlist_embed_text(enc_texts).float().cpu())


def topk_exact_scored(queries: torch.Tensor, gallery, k: int, chunk: Optional[int] = 4096,
                      gallery_chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, the one implementation of it in tvrn.search (`topk_exact`, and a search
    index's shortlist without FAISS): queries (Nq, D), gallery (Ng, D) -> (indices (Nq, k') long, inner products
    (Nq, k')), best first, k' = min(k, Ng).

    gallery: a tensor (used as it is), or rows read by slice and taken as float32 (an ndarray, a
    `tvrn.fileio.NpyRows` file). Queries are taken `chunk` rows at a time (None: all at once), the gallery
    `gallery_chunk` rows at a time (None: whole), so a gallery on disk is never read whole: each block's inner
    products are appended to the best k so far (those first, then the block's rows in gallery order) and
    torch.topk keeps the k best of that row; equal inner products come out in torch.topk's order of it."""
    nq, ng = queries.shape[0], gallery.shape[0]
    k = min(k, ng)
    q_step, g_step = chunk or max(1, nq), gallery_chunk or max(1, ng)
    out_i, out_v = torch.empty(nq, k, dtype=torch.long), None
    for q0 in range(0, nq, q_step):
        q = queries[q0 : q0 + q_step]  # (chunk, D)
        best_v = best_i = None
        for g0 in range(0, ng, g_step):
            block = gallery[g0 : g0 + g_step]  # (block, D)
            if not isinstance(block, torch.Tensor):
                block = torch.as_tensor(np.array(block, dtype=np.float32))
            sims = q @ block.t()  # (chunk, block)
            if best_v is None:  # the first block: its own top k
                keep = sims.topk(min(k, sims.shape[1]), dim=1)
                best_v, best_i = keep.values, keep.indices + g0
            else:
                cand_v = torch.cat([best_v, sims], 1)
                cand_i = torch.cat([best_i, torch.arange(g0, g0 + block.shape[0]).expand(q.shape[0], -1)], 1)
                keep = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
                best_v, best_i = keep.values, cand_i.gather(1, keep.indices)
        if best_v is None:  # an empty gallery
            continue
        if out_v is None:
            out_v = torch.empty(nq, k, dtype=best_v.dtype)
        out_i[q0 : q0 + q_step], out_v[q0 : q0 + q_step] = best_i, best_v
    return out_i, (torch.empty(nq, k) if out_v is None else out_v)


def topk_exact(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Exact top-k by inner product: (Nq, D), (Ng, D) -> (Nq, k) long gallery indices, best first (`chunk` query
    rows at a time against the whole gallery; `topk_exact_scored`)."""
    return topk_exact_scored(queries, gallery, k, chunk=chunk)[0]


def topk_indices(queries: torch.Tensor, gallery: torch.Tensor, k: int, use_faiss: Optional[bool] = None) -> torch.Tensor:
    """Top-k by inner product with FAISS (IndexFlatIP) when it is importable and use_faiss is not False,
    else `topk_exact`. use_faiss=True without FAISS raises ImportError."""
    if use_faiss is not False:
        try:
            import faiss  # noqa: F401
        except ImportError:
            if use_faiss:
                raise
        else:
            index = faiss.IndexFlatIP(gallery.shape[1])
            index.add(gallery.float().contiguous().numpy())
            _, idx = index.search(queries.float().contiguous().numpy(), min(k, gallery.shape[0]))
            return torch.from_numpy(idx).long()
    return topk_exact(queries, gallery, k)


def two_stage_scores(model, enc_images, enc_texts, k_images: int, k_texts: int, use_faiss: Optional[bool] = None,
                     device=None) -> dict[str, Any]:
    """Shortlist with the model's shortlist vectors, re-rank with model.score.

    -> {"t2i": (Ni, Nt) float32, each caption's column holds full scores of its top k_images images, -inf
        elsewhere; "i2t": (Ni, Nt), each image's row holds full scores of its top k_texts captions, -inf
        elsewhere; "pairs_scored": int (union of both shortlists, each pair scored once); "fraction": of Ni*Nt}.
    Stage 2 visits images one at a time (a search engine's query loop), scoring each against the captions
    shortlisted with it in either direction.
    """
    ni, nt = len(enc_images), len(enc_texts)
    gi, gt = shortlist_embeddings(model, enc_images, enc_texts)
    t2i_idx = topk_indices(gt, gi, k_images, use_faiss)  # (Nt, k) images per caption
    i2t_idx = topk_indices(gi, gt, k_texts, use_faiss)  # (Ni, k) captions per image
    in_t2i = torch.zeros(ni, nt, dtype=torch.bool)
    in_t2i[t2i_idx, torch.arange(nt)[:, None].expand_as(t2i_idx)] = True  # (Ni, Nt)
    in_i2t = torch.zeros(ni, nt, dtype=torch.bool)
    in_i2t[torch.arange(ni)[:, None].expand_as(i2t_idx), i2t_idx] = True  # (Ni, Nt)
    cand = in_t2i | in_i2t  # (Ni, Nt) pairs to score
    full = torch.full((ni, nt), -math.inf)
    device = torch.device(device) if device is not None else model_device(model)
    # length-grouping models: each image's captions in length order and cut to the longest, so that the model's
    # length groups are slices of one gather
    lengths = trim_lengths(model, enc_texts)  # (Nt,) or None
    with torch.no_grad(), eval_mode(model):
        for i in range(ni):
            cols = torch.nonzero(cand[i]).reshape(-1)  # (n_i,)
            if not len(cols):
                continue
            txts = enc_texts
            if lengths is not None:
                cols = cols[torch.sort(lengths[cols], stable=True).indices]
                txts = enc_texts.trim(int(lengths[cols[-1]]))
            s = model.score(enc_images[i : i + 1].to(device), txts[cols].to(device))  # (1, n_i)
            full[i, cols] = s[0].float().cpu()
    pairs = int(cand.sum())
    return {"t2i": full.masked_fill(~in_t2i, -math.inf), "i2t": full.masked_fill(~in_i2t, -math.inf),
            "pairs_scored": pairs, "fraction": pairs / max(1, ni * nt)}


def evaluate_two_stage(model, enc_images, enc_texts, caption_to_image: torch.Tensor,
                       ks: Sequence[tuple[int, int]], exact_scores: Optional[torch.Tensor] = None,
                       use_faiss: Optional[bool] = None) -> list[dict[str, Any]]:
    """For each (k_images, k_texts): two-stage metrics next to exact ones.

    -> [{"k_images", "k_texts", "fraction" (of pairs scored), "pairs_scored", "i2t/R@1"... "rsum" (two-stage:
    i2t metrics from the i2t matrix, t2i metrics from the t2i matrix), "exact/rsum", "rsum_gap"}].
    exact_scores: the full (Ni, Nt) matrix if already computed (else computed with score_all)."""
    from ..scoring import score_all

    c2i = torch.as_tensor(caption_to_image).long()
    if exact_scores is None:
        exact_scores = score_all(model, enc_images, enc_texts)
    exact = evaluate(exact_scores, c2i)
    rows = []
    for k_images, k_texts in ks:
        r = two_stage_scores(model, enc_images, enc_texts, k_images, k_texts, use_faiss)
        i2t = {k: v for k, v in evaluate(r["i2t"], c2i).items() if k.startswith("i2t/")}
        t2i = {k: v for k, v in evaluate(r["t2i"], c2i).items() if k.startswith("t2i/")}
        m = {**i2t, **t2i}
        m["rsum"] = sum(v for k, v in m.items() if "/R@" in k)
        rows.append({"k_images": k_images, "k_texts": k_texts, "fraction": r["fraction"],
                     "pairs_scored": r["pairs_scored"], **m, "exact/rsum": exact["rsum"],
                     "rsum_gap": exact["rsum"] - m["rsum"], "exact": exact})
    return rows
