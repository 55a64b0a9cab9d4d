"""SCAN (Lee et al., ECCV 2018): stacked cross attention, cosine per word (t2i) or per region (i2t),
aggregated by LogSumExp or mean. No parameters beyond the two encoders.

Per image: V = l2(FC(F)) (Ni, R, D). Per caption: T (Nt, L, D). Per pair: attention + cosines (Ni, Nt).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from .base import EncodedImages, EncodedTexts, RetrievalModel, gram, inference_gram
from .config import ModelConfig
from .layers import EPS, NEG, RegionEncoder, attention_weights, l2norm
from .text import build_text_encoder


class SCAN(RetrievalModel):
    preferred_block = (64, 128)  # score_all block cap: ~8K pairs keep the (pairs, L, R) tensors in cache
    score_groups_by_length = True  # inference scores each caption length separately: score_all cuts blocks there

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.img_enc = RegionEncoder(config.img_dim, config.embed_size, normalize=config.image_norm)
        self.txt_enc = build_text_encoder(config)

    @property
    def _unit_queries(self) -> bool:
        """Queries (words for t2i, regions for i2t) are unit vectors: the cosine needs no division by their norm."""
        c = self.config
        return c.text_norm if c.direction == "t2i" else c.image_norm

    def encode_image(self, images, record: Optional[dict] = None) -> EncodedImages:
        """record: accepted for the common interface (`tvrn.models.explain`); SCAN has no image-side weights."""
        mask = images.mask.bool()
        V = self.img_enc(images.features, mask)  # (Ni, R, D)
        # t2i attends regions: their Gram matrix is per-image work of the fast path (i2t attends words)
        t2i = self.config.direction == "t2i"
        return EncodedImages(regions=V, mask=mask, units_gram=inference_gram(V) if t2i else None)

    def encode_text(self, texts) -> EncodedTexts:
        mask = texts.mask.bool()
        return EncodedTexts(words=self.txt_enc(texts.tokens, mask), mask=mask)

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """(Ni, Nt) aggregated cosines, rows images, columns captions (fast path for inference)."""
        if self.training or torch.is_grad_enabled() or self.config.attention_norm != "clipped_l2norm":
            return self._score_plain(images, texts)  # the fast kernel is written for the default normalisation
        return self._score_fast(images, texts)

    def pair_bytes(self, images: EncodedImages, texts: EncodedTexts) -> int:
        """Working bytes per pair of the fast path: the raw scores, the weights, their Gram product and the
        aggregation temporaries, about six live (L, R) float tensors."""
        return 4 * 6 * texts.words.shape[1] * images.regions.shape[1]

    def _score_fast(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """`_score_plain` for inference, exact up to float rounding, one length group of captions at a time.

        Captions are scored per length (no padded words); `scan_cross_attention` does the pair work."""
        vmask = None if bool(images.mask.all()) else images.mask  # (Ni, R) or None: every region real
        groups = texts.length_groups()
        if groups is None:  # padding inside a caption, or an empty caption: one masked call
            return self._score_group(images, vmask, texts, texts.mask)
        out = images.regions.new_empty((len(images), len(texts)))  # (Ni, Nt)
        for idx, n in groups:
            out[:, idx] = self._score_group(images, vmask, texts[idx].trim(n), None)
        return out

    def _score_group(self, images: EncodedImages, vmask, texts: EncodedTexts, tmask) -> torch.Tensor:
        """(Ni, Nt) for region mask vmask (Ni, R) and word mask tmask (Nt, L), each None when all real."""
        V, T, lam = images.regions, texts.words, self.config.lambda_softmax  # (Ni, R, D), (Nt, L, D)
        if self.config.direction == "t2i":  # context regions (owned by images), queries words
            cos = scan_cross_attention(V, vmask, T, tmask, lam, gram=images.units_gram)  # (Ni, Nt, L)
            if not self._unit_queries:
                cos = cos / T.norm(dim=-1).clamp_min(EPS)[None]  # cosine with non-unit words
            return self._aggregate(cos, None if tmask is None else tmask[None])  # (Ni, Nt)
        cos = scan_cross_attention(T, tmask, V, vmask, lam)  # (Nt, Ni, R): context words, queries regions
        if not self._unit_queries:
            cos = cos / V.norm(dim=-1).clamp_min(EPS)[None]
        return self._aggregate(cos, None if vmask is None else vmask[None]).t()  # (Ni, Nt)

    def _aggregate(self, cos: torch.Tensor, qmask) -> torch.Tensor:
        """(..., Lq) cosines, qmask broadcastable to them (True: real query) or None (all real) -> (...):
        LogSumExp (lambda_lse), mean, max or sum over the real queries (SCAN's agg_func)."""
        c = self.config
        if c.agg == "lse":
            z = c.lambda_lse * cos
            return torch.logsumexp(z if qmask is None else z.masked_fill(~qmask, NEG), -1) / c.lambda_lse
        if c.agg == "max":
            return (cos if qmask is None else cos.masked_fill(~qmask, NEG)).amax(-1)
        if qmask is not None:
            qmask = qmask.expand_as(cos)
            cos = cos * qmask
        total = cos.sum(-1)
        if c.agg == "sum":
            return total
        return total / (cos.shape[-1] if qmask is None else qmask.sum(-1).clamp_min(1))

    def _score_plain(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """The plain computation (autograd, training) for all pairs (Ni, Nt)."""
        return self._pair_core(images.regions[:, None], images.mask[:, None], texts.words[None], texts.mask[None])

    def score_pairs(self, images: EncodedImages, texts: EncodedTexts, record: Optional[dict] = None) -> torch.Tensor:
        """(P,) scores of the aligned pairs (images[p], texts[p]): the plain path with one pair axis.
        record: a dict that receives the pair side's intermediates (see `_pair_core`), or None (scoring)."""
        if len(images) != len(texts):
            raise ValueError(f"score_pairs needs as many images as captions, got {len(images)} and {len(texts)}")
        return self._pair_core(images.regions, images.mask, texts.words, texts.mask, record)

    def inference_encodings(self, images: EncodedImages) -> EncodedImages:
        """Adds V V^T (Ni, R, R), which the t2i fast path reads, to encodings made with gradients."""
        if self.config.direction != "t2i" or images.units_gram is not None:
            return images
        with torch.no_grad():
            return replace(images, units_gram=gram(images.regions.detach()))

    def _pair_core(self, V, vmask, T, tmask, record: Optional[dict] = None) -> torch.Tensor:
        """Attended vectors, cosines, aggregation for broadcastable regions V (.., R, D), vmask (.., R), words
        T (.., L, D), tmask (.., L) -> scores (broadcast leading shape).

        record: None (scoring), or a dict that receives what this computation used (`tvrn.models.explain`):
        "attention" (.., Lq, Lc) the weights of each query over its context (t2i: words over regions (.., L, R);
        i2t: regions over words (.., R, L)), "cosines" (.., Lq) each query's cosine with its attended vector
        (the per-word, or per-region, similarities the score aggregates), "score" (..)."""
        c = self.config
        if c.direction == "t2i":  # queries: words, context: regions
            q, ctx, qmask, cmask = T, V, tmask, vmask
        else:  # queries: regions, context: words
            q, ctx, qmask, cmask = V, T, vmask, tmask
        s = q @ ctx.transpose(-1, -2)  # (.., Lq, D) @ (.., D, Lc) -> (.., Lq, Lc)
        m = qmask[..., :, None] & cmask[..., None, :]  # (.., Lq, Lc)
        a = attention_weights(s, m, c.lambda_softmax, norm=c.attention_norm)  # (.., Lq, Lc)
        attended = l2norm(a @ ctx)  # (.., Lq, Lc) @ (.., Lc, D) -> (.., Lq, D)
        cos = (attended * q).sum(-1)  # (.., Lq)
        if not self._unit_queries:
            cos = cos / q.norm(dim=-1).clamp_min(EPS)  # SCAN's cosine_similarity with non-unit queries
        score = self._aggregate(cos, qmask)
        if record is not None:
            record.update(attention=a, cosines=cos, score=score)
        return score


def scan_cross_attention(C: torch.Tensor, cmask, Q: torch.Tensor, qmask, lam: float,
                         gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cosines between every query token and its attended context, for all pairs of a block.

    C (B1, Lc, D) context tokens (unit, padded rows zero) of B1 items, cmask (B1, Lc) bool or None (all real);
    Q (B2, Lq, D) query tokens of B2 items, qmask (B2, Lq) or None. Returns (B1, B2, Lq): for the pair (b1, b2)
    and query q, <l2(sum_j a_j C_j), Q_q> with SCAN's weights a (`attention_weights`); rows of padded queries are
    finite garbage. gram: (B1, Lc, Lc) C C^T if the caller has it (per-item work), else computed here.

    Exact shortcuts, no attended vectors formed: the raw scores s = <C_j, Q_q> of all pairs are one matrix
    product laid out (B1, Lc, B2, Lq), so the l2 norm across queries is over the last (contiguous) axis and the
    softmax over context is a reduction over axis 1. <l2(sum_j a_j C_j), Q> = (sum_j a_j s_j) / ||sum_j a_j C_j||,
    ||sum_j a_j C_j||^2 = a^T G a with G = C C^T per context item (one batched product for all pairs). The ratio
    is invariant to the scale of a, so the softmax is not normalised: a_j = exp(lam * s'_j - shift), where s'
    (l2-normalised across queries) lies in [-1, 1] and needs no max subtraction (shift keeps exp below e^10,
    within float16). Only l2norm's EPS sees the scale, so it is multiplied by sum_j a_j.
    """
    B1, Lc, D = C.shape
    B2, Lq, _ = Q.shape
    raw = (C.reshape(B1 * Lc, D) @ Q.reshape(B2 * Lq, D).t()).view(B1, Lc, B2, Lq)  # <C_j, Q_q>
    if cmask is not None or qmask is not None:  # padded tokens score 0: excluded from the norm across queries
        m = torch.ones(B1, Lc, 1, 1, dtype=torch.bool, device=C.device) if cmask is None else cmask[:, :, None, None]
        raw.masked_fill_(~(m & (True if qmask is None else qmask[None, None])), 0.0)
    w = F.leaky_relu(raw, 0.1)  # (B1, Lc, B2, Lq)
    norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)  # (B1, Lc, B2, 1) across the queries of a pair
    w.mul_(lam / (norm + EPS))
    shift = max(0.0, lam - 10.0)
    if shift:
        w.sub_(shift)
    w.exp_()  # unnormalised softmax weights over the context axis (1)
    if cmask is not None:
        w.mul_(cmask[:, :, None, None])  # padded context tokens get no weight
    total = w.sum(1)  # (B1, B2, Lq) the softmax's normaliser: l2norm's EPS applies to the normalised weights
    gram = C @ C.transpose(1, 2) if gram is None else gram  # (B1, Lc, Lc)
    quad = torch.bmm(gram, w.view(B1, Lc, B2 * Lq)).view_as(w).mul_(w).sum(1)  # (B1, B2, Lq) a^T G a
    num = raw.mul_(w).sum(1)  # (B1, B2, Lq) sum_j a_j s_j
    return num / (quad.clamp_min(0).sqrt() + EPS * total)  # (B1, B2, Lq)
