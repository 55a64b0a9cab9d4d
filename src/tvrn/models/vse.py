"""VSE dual encoder: pooled image and caption vectors, cosine. Pair work is one matmul; the shortlist stage."""
from __future__ import annotations

import torch

from .base import EncodedImages, EncodedTexts, RetrievalModel
from .config import ModelConfig
from .layers import NEG, RegionEncoder, l2norm, masked_mean
from .text import build_text_encoder


def _pool(x, mask, how):
    """(B, N, D), (B, N) -> (B, D) unit length."""
    if how == "max":
        return l2norm(x.masked_fill(~mask.unsqueeze(-1), NEG).amax(1))
    return l2norm(masked_mean(x, mask))


class VSE(RetrievalModel):
    blocked_training = False  # pair work is one (B, B) matmul: plain autograd is already exact and minimal

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.img_enc = RegionEncoder(config.img_dim, config.embed_size)
        self.txt_enc = build_text_encoder(config)

    def encode_image(self, images) -> EncodedImages:
        mask = images.mask.bool()
        V = self.img_enc(images.features, mask)  # (Ni, R, D)
        return EncodedImages(regions=V, mask=mask, glob=_pool(V, mask, self.config.pool))

    def encode_text(self, texts) -> EncodedTexts:
        mask = texts.mask.bool()
        T = self.txt_enc(texts.tokens, mask)  # (Nt, L, D)
        return EncodedTexts(words=T, mask=mask, glob=_pool(T, mask, self.config.pool))

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        return images.glob @ texts.glob.T  # (Ni, D) @ (D, Nt) -> (Ni, Nt)

    def score_pairs(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """(P,) cosines of the aligned pairs (images[p], texts[p])."""
        return (images.glob * texts.glob).sum(-1)

    def pair_bytes(self, images: EncodedImages, texts: EncodedTexts) -> int:
        return 8  # one float score (+ slack)

    def shortlist_embed_image(self, images: EncodedImages) -> torch.Tensor:
        return images.glob

    def shortlist_embed_text(self, texts: EncodedTexts) -> torch.Tensor:
        return texts.glob
