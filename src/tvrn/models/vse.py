"""VSE dual encoder: pooled image and caption vectors, cosine. Pair work is one matmul; the shortlist stage."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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

    def encode_image(self, images, record: Optional[dict] = None) -> EncodedImages:
        """record: accepted for the common interface (`tvrn.models.explain`); nothing to record."""
        mask = images.mask.bool()
        V = self.img_enc(images.features, mask)  # (Ni, R, D)
        return EncodedImages(regions=V, mask=mask, glob=_pool(V, mask, self.config.pool))

    def encode_text(self, texts) -> EncodedTexts:
        mask = texts.mask.bool()
        T = self.txt_enc(texts.tokens, mask)  # (Nt, L, D)
        return EncodedTexts(words=T, mask=mask, glob=_pool(T, mask, self.config.pool))

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        return images.glob @ texts.glob.T  # (Ni, D) @ (D, Nt) -> (Ni, Nt)

    def score_pairs(self, images: EncodedImages, texts: EncodedTexts, record: Optional[dict] = None) -> torch.Tensor:
        """(P,) cosines of the aligned pairs (images[p], texts[p]). record: dict receiving "score", or None: a
        dual encoder computes no word-to-region alignment."""
        score = (images.glob * texts.glob).sum(-1)
        if record is not None:
            record["score"] = score
        return score

    def pair_bytes(self, images: EncodedImages, texts: EncodedTexts) -> int:
        return 8  # one float score (+ slack)

    def shortlist_embed_image(self, images: EncodedImages) -> torch.Tensor:
        return images.glob

    def shortlist_embed_text(self, texts: EncodedTexts) -> torch.Tensor:
        return texts.glob


# ----------------------------------------------------------------------------------- VSE-infinity (GPO pooling)
def positional_encoding(length: int, dim: int, device=None) -> torch.Tensor:
    """(length, dim) sinusoidal encoding of positions 0..length-1 (sin on even, cos on odd channels)."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class GPO(nn.Module):
    """Generalized pooling operator (Chen et al., VSE-infinity, CVPR 2021).

    features (B, N, D), mask (B, N) prefix of real tokens -> (B, D): each dimension's values sorted in
    descending order over the real tokens and summed with weights w_k that depend only on the rank k and the token
    count n: a bidirectional GRU (directions averaged) over the positional encodings of 0..n-1, a linear score
    per position, softmax of score / 0.1 over the real positions."""

    def __init__(self, dim: int = 32, hidden: int = 32):
        super().__init__()
        self.dim = dim
        self.gru = nn.GRU(dim, hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden, 1, bias=False)

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) mask -> (B, N, 1) pooling weights (0 on padding)."""
        B, N = mask.shape
        lengths = mask.sum(1).clamp_min(1)
        pe = positional_encoding(N, self.dim, mask.device).to(self.linear.weight.dtype)
        pe = pe[None].expand(B, N, self.dim) * mask[..., None]  # (B, N, d), zero on padding
        packed = pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=N)  # (B, N, 2h)
        h = out.shape[-1] // 2
        scores = self.linear((out[..., :h] + out[..., h:]) / 2).masked_fill(~mask[..., None], -10000.0)  # (B, N, 1)
        return torch.softmax(scores / 0.1, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ranked = features.masked_fill(~mask[..., None], -10000.0).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~mask[..., None], 0.0)  # real tokens first in every dimension (prefix masks)
        return (ranked * self.weights(mask)).sum(1)  # (B, D)


class ResidualMLP(nn.Module):
    """VSE-infinity's image MLP: Linear(Dv, D/2) -> BatchNorm -> ReLU -> Linear(D/2, D), per region (B, R, Dv)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden)])  # the official MLP also builds an unused second one

    def forward(self, x):
        B, N, _ = x.shape
        h = torch.relu(self.bns[0](self.layers[0](x.reshape(B * N, -1))))  # (B*N, hidden)
        return self.layers[1](h).view(B, N, -1)  # (B, N, out)


class VSEGPO(RetrievalModel):
    """VSE-infinity (Chen et al., CVPR 2021): regions embedded by FC + residual MLP, words by a GRU or BERT (no
    per-word l2), both pooled by GPO, l2-normalised; score = cosine. Pair work is one matmul, as VSE's."""

    blocked_training = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        D = c.embed_size
        self.img_enc = RegionEncoder(c.img_dim, D, normalize=False)
        self.img_mlp = ResidualMLP(c.img_dim, D // 2, D)
        self.img_pool = GPO(c.gpo_dim, c.gpo_dim)
        self.txt_enc = build_text_encoder(c, normalize=False)
        self.txt_pool = GPO(c.gpo_dim, c.gpo_dim)

    def _finish(self, pooled: torch.Tensor, norm: bool) -> torch.Tensor:
        return l2norm(pooled) if norm else pooled

    def encode_image(self, images, record: Optional[dict] = None) -> EncodedImages:
        """record: accepted for the common interface (`tvrn.models.explain`); nothing to record."""
        mask = images.mask.bool()
        V = (self.img_enc(images.features, mask) + self.img_mlp(images.features)) * mask[..., None]  # (Ni, R, D)
        return EncodedImages(regions=V, mask=mask, glob=self._finish(self.img_pool(V, mask), self.config.image_norm))

    def encode_text(self, texts) -> EncodedTexts:
        mask = texts.mask.bool()
        T = self.txt_enc(texts.tokens, mask)  # (Nt, L, D), not normalised per word
        return EncodedTexts(words=T, mask=mask, glob=self._finish(self.txt_pool(T, mask), self.config.text_norm))

    def score(self, images: EncodedImages, texts: EncodedTexts) -> torch.Tensor:
        """(Ni, Nt) cosines (dot products of the pooled vectors; with --no_imgnorm / --no_txtnorm, as the official
        code, the raw dot product)."""
        return images.glob @ texts.glob.T

    def score_pairs(self, images: EncodedImages, texts: EncodedTexts, record: Optional[dict] = None) -> torch.Tensor:
        """(P,) scores of the aligned pairs; record as VSE.score_pairs."""
        score = (images.glob * texts.glob).sum(-1)
        if record is not None:
            record["score"] = score
        return score

    def pair_bytes(self, images: EncodedImages, texts: EncodedTexts) -> int:
        return 8

    def shortlist_embed_image(self, images: EncodedImages) -> torch.Tensor:
        return images.glob

    def shortlist_embed_text(self, texts: EncodedTexts) -> torch.Tensor:
        return texts.glob
