"""SCAN (Lee et al., ECCV 2018): stacked cross attention, cosine per word (t2i) or per region (i2t),
aggregated by LogSumExp or mean. No parameters beyond the two encoders.

Per image: V = l2(FC(F)) (Ni, R, D). Per caption: T (Nt, L, D). Per pair: attention + cosines (Ni, Nt).
"""
from __future__ import annotations

import torch

from .base import EncodedImages, EncodedTexts, RetrievalModel
from .config import ModelConfig
from .layers import NEG, RegionEncoder, attention_weights, l2norm
from .text import build_text_encoder


class SCAN(RetrievalModel):
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
        """(Ni, Nt) aggregated cosines, rows images, columns captions."""
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
