"""A tiny retrieval model and data set implementing the model interface, for the training / scoring tests.

ToyModel: regions (B, R, Dv) -> (B, R, D) unit vectors; words (B, L) -> (B, L, D) unit vectors (embedding +
linear); score = mean over real words of the max over real regions of the cosine (a SCAN-like late
interaction with padding on both sides, so padded concatenation is exercised). Dropout on the image side makes
the training RNG matter.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F

from tvrn.data.batch import ImageBatch, PairBatch, TextBatch


def _slice(obj, idx):
    return replace(obj, **{f.name: getattr(obj, f.name)[idx] for f in fields(obj)})


def _to(obj, device=None):
    return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)})


@dataclass
class EncodedImages:
    regions: torch.Tensor  # (N, R, D)
    region_mask: torch.Tensor  # (N, R) bool

    def __len__(self):
        return self.regions.shape[0]

    def __getitem__(self, idx):
        return _slice(self, idx)

    def to(self, device=None):
        return _to(self, device)


@dataclass
class EncodedTexts:
    words: torch.Tensor  # (N, L, D)
    mask: torch.Tensor  # (N, L) bool

    def __len__(self):
        return self.words.shape[0]

    def __getitem__(self, idx):
        return _slice(self, idx)

    def to(self, device=None):
        return _to(self, device)


@dataclass
class ToyConfig:
    dv: int = 6  # region feature size
    vocab: int = 20  # vocabulary size
    d: int = 8  # joint size
    dropout: float = 0.1  # on the projected regions


class ToyModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.config = ToyConfig(**kw)
        c = self.config
        self.img = nn.Linear(c.dv, c.d)
        self.emb = nn.Embedding(c.vocab, c.d)
        self.txt = nn.Linear(c.d, c.d)
        self.drop = nn.Dropout(c.dropout)

    def encode_image(self, images: ImageBatch) -> EncodedImages:
        v = F.normalize(self.drop(self.img(images.features)), dim=-1)  # (B, R, D)
        return EncodedImages(v, images.mask)

    def encode_text(self, texts: TextBatch) -> EncodedTexts:
        t = F.normalize(self.txt(self.emb(texts.tokens)), dim=-1)  # (B, L, D)
        return EncodedTexts(t, texts.mask)

    def score(self, ei: EncodedImages, et: EncodedTexts) -> torch.Tensor:
        sim = torch.einsum("ird,tld->itlr", ei.regions, et.words)  # (Ni, Nt, L, R)
        sim = sim.masked_fill(~ei.region_mask[:, None, None, :], -2.0)
        best = sim.max(-1).values  # (Ni, Nt, L)
        m = et.mask[None].float()  # (1, Nt, L)
        return (best * m).sum(-1) / m.sum(-1).clamp(min=1)  # (Ni, Nt)

    def pair_bytes(self, ei: EncodedImages, et: EncodedTexts) -> int:
        return ei.regions.shape[1] * et.words.shape[1] * 4 * 2

    def forward(self, images: ImageBatch, texts: TextBatch) -> torch.Tensor:
        return self.score(self.encode_image(images), self.encode_text(texts))


def make_split(n_images: int, caps_per_image: int = 2, r: int = 4, l: int = 5, seed: int = 0, dv: int = 6,
               vocab: int = 20):
    """Synthetic split: image features (Ni, R, Dv) with 1..R real regions, captions (Nt, L) with 2..L words
    correlated with their image (token ids drawn around an image-specific topic)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_images, r, dv, generator=g)
    rmask = torch.arange(r)[None] < torch.randint(1, r + 1, (n_images, 1), generator=g)
    n_caps = n_images * caps_per_image
    c2i = torch.arange(n_caps) // caps_per_image
    topic = torch.randint(0, vocab, (n_images,), generator=g)
    tokens = (topic[c2i][:, None] + torch.randint(0, 3, (n_caps, l), generator=g)) % vocab
    tmask = torch.arange(l)[None] < torch.randint(2, l + 1, (n_caps, 1), generator=g)
    tokens = tokens.masked_fill(~tmask, 0)
    return {"features": feats, "region_mask": rmask, "tokens": tokens, "token_mask": tmask, "c2i": c2i}


class PairDataset(torch.utils.data.Dataset):
    """Item k = caption k with its image."""

    def __init__(self, split):
        self.s = split

    def __len__(self):
        return self.s["tokens"].shape[0]

    def __getitem__(self, k):
        return k


def make_collate(split, seen=None):
    """Collate caption indices into a PairBatch; appends the indices to `seen` when given."""

    def collate(idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        if seen is not None:
            seen.extend(idx.tolist())
        img = split["c2i"][idx]
        images = ImageBatch(split["features"][img], split["region_mask"][img], index=img)
        texts = TextBatch(split["tokens"][idx], split["token_mask"][idx], caption_to_image=img, index=idx)
        return PairBatch(images, texts, img)

    return collate


def image_batches(split, bs):
    n = split["features"].shape[0]
    for i in range(0, n, bs):
        yield ImageBatch(split["features"][i:i + bs], split["region_mask"][i:i + bs])


def text_batches(split, bs):
    n = split["tokens"].shape[0]
    for i in range(0, n, bs):
        # trim padding per batch so concatenation must pad
        m = split["token_mask"][i:i + bs]
        lmax = int(m.sum(1).max())
        yield TextBatch(split["tokens"][i:i + bs, :lmax], m[:, :lmax])


def make_validate(split):
    from tvrn.evaluation import evaluate
    from tvrn.scoring import encode_images, encode_texts, score_all

    def validate(model):
        ei = encode_images(model, image_batches(split, 7))
        et = encode_texts(model, text_batches(split, 5))
        return evaluate(score_all(model, ei, et, block_images=4, block_texts=6), split["c2i"])

    return validate
