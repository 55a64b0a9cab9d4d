"""A 16-pair batch and tiny float64 models for the global-negatives test (tests/test_distributed.py)."""
from __future__ import annotations

import torch

from tvrn.data.batch import ImageBatch, PairBatch, TextBatch
from tvrn.models import create_model

MODELS = ["tvrn_sgr", "sgraf_sgr", "scan_t2i", "vse"]
# (model, loss mode, config overrides): the designed models with the hardest-negative loss, and TVRN as published
# (first-image refinement against the GLOBAL batch's first image) with the published loss; its BatchNorm pooling
# is replaced by LayerNorm here, since training-mode BatchNorm normalises over each rank's own images
CASES = [(name, "max", {}) for name in MODELS] + [
    ("tvrn_sgr_published", "published", dict(refine_against="first_image", image_pool_norm="layer", word_dropout=0.0))]
IMAGE_OF_PAIR = [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8, 9, 10, 11, 0, 12]  # repeated images: positives, never negatives
LENGTHS = [7, 4, 6, 3, 5, 7, 2, 6, 4, 5, 3, 7, 6, 2, 5, 4]


def build(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, **{**dict(img_dim=12, embed_size=16, sim_dim=8, word_dim=10, vocab_size=30,
                                        dropout=0.0), **overrides}).double().train()


def batch_of(pairs) -> PairBatch:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(13, 5, 12, generator=g, dtype=torch.float64)
    adj = torch.rand(13, 5, 5, generator=g) > 0.5
    tokens = torch.randint(4, 30, (16, 7), generator=g)
    pairs = list(pairs)
    img = torch.tensor([IMAGE_OF_PAIR[p] for p in pairs])
    L = max(LENGTHS[p] for p in pairs)  # every rank pads its own batch to its longest caption
    mask = torch.arange(L)[None] < torch.tensor([LENGTHS[p] for p in pairs])[:, None]
    images = ImageBatch(features=feats[img], mask=torch.ones(len(pairs), 5, dtype=torch.bool),
                        adjacency=adj[img] | adj[img].transpose(1, 2))
    texts = TextBatch(tokens=tokens[pairs, :L] * mask, mask=mask)
    return PairBatch(images, texts, img)
