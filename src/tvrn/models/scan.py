"""SCAN (Lee et al., ECCV 2018): stacked cross attention, cosine per word (t2i) or per region (i2t),
aggregated by LogSumExp or mean. No parameters beyond the two encoders.

Per image: V = l2(FC(F)) (Ni, R, D). Per caption: T (Nt, L, D). Per pair: attention + cosines (Ni, Nt).
"""
from __future__ import annotations

import torch

from .base import EncodedImages, EncodedTexts, RetrievalModel
from .config import ModelConfig
from .layers import EPS, NEG, RegionEncoder, attention_weights, l2norm
from .text import build_text_encoder


class SCAN(RetrievalModel):
    preferred_block = (32, 64)  # score_all block cap: ~2K pairs keep the (pairs, L, R) tensors in cache

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.img_enc = RegionEncoder(config.img_dim, config.embed_size)
        self.txt_enc = build_text_encoder(config)

    def encode_image(self, images) -> EncodedImages:
        mask = images.mask.bool()
        return EncodedImages(regions=self.img_enc(images.features, mask), mask=mask)

    def encode_text(self, texts) -> EncodedTexts:
        mask = texts.mask.bool()
        return EncodedTexts(words=self.txt_enc(texts.tokens, mask), mask=mask)

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """(Ni, Nt) aggregated cosines, rows images, columns captions (fast path for inference)."""
        if self.training or torch.is_grad_enabled():
            return self._score_plain(images, texts)
        return self._score_fast(images, texts)

    def pair_bytes(self, images: EncodedImages, texts: EncodedTexts) -> int:
        """Working bytes per pair of the fast path: up to ten live (L, R) float tensors (scores, their copy,
        attention temporaries, products) — measured peak is about eight."""
        return 4 * 10 * texts.words.shape[1] * images.regions.shape[1]

    def _score_fast(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """`_score_plain` without forming attended vectors (exact): with a = attention weights and s the raw
        query-context scores, <l2(sum_j a_j C_j), Q> = (sum_j a_j s_j) / ||sum_j a_j C_j|| and
        ||sum_j a_j C_j||^2 = a^T (C C^T) a from the per-item Gram matrix. Scores of all pairs: one matmul."""
        c = self.config
        n = int(texts.mask.sum(1).max()) if len(texts) else 0
        texts = texts.trim(max(n, 1))  # drop padding every caption of the block has
        V, vmask, T, tmask = images.regions, images.mask, texts.words, texts.mask  # (Ni,R,D), (Ni,R), (Nt,L,D), (Nt,L)
        Ni, R, D = V.shape
        Nt, L = tmask.shape
        raw = (T.reshape(Nt * L, D) @ V.reshape(Ni * R, D).t()).view(Nt, L, Ni, R)  # one matmul: <T_l, V_r>
        if c.direction == "t2i":  # queries words, context regions; layout (Ni, Nt, L, R), Gram per image
            raw = raw.permute(2, 0, 1, 3).contiguous()  # (Ni, Nt, L, R)
            m = tmask[None, :, :, None] & vmask[:, None, None, :]  # (Ni, Nt, L, R)
            gram, qmask = V @ V.transpose(1, 2), tmask[None].expand(Ni, Nt, L)  # (Ni, R, R), (Ni, Nt, L)
        else:  # queries regions, context words; layout (Nt, Ni, R, L), Gram per caption
            raw = raw.permute(0, 2, 3, 1).contiguous()  # (Nt, Ni, R, L)
            m = vmask[None, :, :, None] & tmask[:, None, None, :]  # (Nt, Ni, R, L)
            gram, qmask = T @ T.transpose(1, 2), vmask[None].expand(Nt, Ni, R)  # (Nt, L, L), (Nt, Ni, R)
        a = attention_weights(raw, m, c.lambda_softmax)  # (B1, B2, Lq, Lc)
        B1, B2, Lq, Lc = a.shape
        num = (a * raw).sum(-1)  # (B1, B2, Lq) <attended, query> before normalisation
        flat = a.view(B1, B2 * Lq, Lc)
        quad = (torch.bmm(flat, gram) * flat).sum(-1).view(B1, B2, Lq)  # (B1,B2*Lq,Lc)@(B1,Lc,Lc) -> ||attended||^2
        cos = num / (quad.clamp_min(0).sqrt() + EPS)  # (B1, B2, Lq)
        if c.agg == "lse":
            agg = torch.logsumexp((c.lambda_lse * cos).masked_fill(~qmask, NEG), -1) / c.lambda_lse  # (B1, B2)
        else:
            agg = (cos * qmask).sum(-1) / qmask.sum(-1).clamp_min(1)  # (B1, B2)
        return agg if c.direction == "t2i" else agg.t()  # (Ni, Nt)

    def _score_plain(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """The plain computation (autograd, training): attended vectors, cosines, aggregation."""
        c = self.config
        V, vmask, T, tmask = images.regions, images.mask, texts.words, texts.mask
        if c.direction == "t2i":  # queries: words, context: regions
            q, ctx, qmask, cmask = T[None], V[:, None], tmask[None, :], vmask[:, None]  # (1,Nt,L,D), (Ni,1,R,D)
        else:  # queries: regions, context: words
            q, ctx, qmask, cmask = V[:, None], T[None], vmask[:, None], tmask[None, :]  # (Ni,1,R,D), (1,Nt,L,D)
        s = q @ ctx.transpose(-1, -2)  # (Ni, Nt, Lq, Lc)
        m = qmask[..., :, None] & cmask[..., None, :]  # (Ni, Nt, Lq, Lc)
        a = attention_weights(s, m, c.lambda_softmax)  # (Ni, Nt, Lq, Lc)
        attended = l2norm(a @ ctx)  # (Ni, Nt, Lq, Lc) @ (., ., Lc, D) -> (Ni, Nt, Lq, D)
        cos = (attended * q).sum(-1)  # (Ni, Nt, Lq)
        qmask = qmask.expand_as(cos)
        if c.agg == "lse":
            lse = torch.logsumexp((c.lambda_lse * cos).masked_fill(~qmask, NEG), -1)  # (Ni, Nt)
            return lse / c.lambda_lse
        return (cos * qmask).sum(-1) / qmask.sum(-1).clamp_min(1)  # (Ni, Nt)
