"""Fixtures shared by several test files: the data tests' precomp_* writers, and `setup`, the tiny rendered search
index (test_search, test_serve, test_explain, test_hostile_search). Plain helpers live in helpers.py."""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import pytest


def _random_boxes(rng: np.random.Generator, shape: tuple[int, ...], width: float = 100.0) -> np.ndarray:
    """(..., 4) valid boxes x1, y1, x2, y2 inside a width x width image."""
    xy = rng.uniform(0, width * 0.7, size=shape + (2,))
    wh = rng.uniform(1, width * 0.3, size=shape + (2,))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


@pytest.fixture
def precomp_write() -> Callable[..., dict]:
    """write(root, split, n_images, R=3, Dv=4, repeated=False, boxes=True, sizes=True, ids=True, seed=0,
    captions=None) writes a precomp split and returns the unique-image arrays it wrote:
    {"features": (N_img, R, Dv), "boxes": (N_img, R, 4) or None, "sizes": (N_img, 2) or None,
    "ids": list or None, "captions": list of 5 * N_img}. With repeated, every file row is repeated 5 times."""

    def write(
        root,
        split: str,
        n_images: int,
        R: int = 3,
        Dv: int = 4,
        repeated: bool = False,
        boxes: bool = True,
        sizes: bool = True,
        ids: bool = True,
        seed: int = 0,
        captions: Optional[list[str]] = None,
    ) -> dict:
        rng = np.random.default_rng(seed)
        os.makedirs(root, exist_ok=True)
        rep = 5 if repeated else 1
        feats = rng.standard_normal((n_images, R, Dv)).astype(np.float32)
        np.save(os.path.join(root, f"{split}_ims.npy"), np.repeat(feats, rep, axis=0))
        if captions is None:
            captions = [f"A photo number {i // 5} caption {i % 5}." for i in range(5 * n_images)]
        with open(os.path.join(root, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(captions) + "\n")
        out = {"features": feats, "boxes": None, "sizes": None, "ids": None, "captions": captions}
        if boxes:
            out["boxes"] = _random_boxes(rng, (n_images, R))
            np.save(os.path.join(root, f"{split}_ims_bbx.npy"), np.repeat(out["boxes"], rep, axis=0))
        if sizes:
            out["sizes"] = rng.integers(100, 640, size=(n_images, 2)).astype(np.float32)
            np.save(os.path.join(root, f"{split}_ims_size.npy"), np.repeat(out["sizes"], rep, axis=0))
        if ids:
            out["ids"] = [str(1000 + 7 * i) for i in range(n_images)]
            with open(os.path.join(root, f"{split}_ids.txt"), "w") as f:
                f.write("\n".join(np.repeat(out["ids"], rep).tolist()) + "\n")
        return out

    return write


@pytest.fixture
def precomp_random_boxes() -> Callable[..., np.ndarray]:
    """random_boxes(rng, shape) -> (*shape, 4) valid float32 boxes."""
    return _random_boxes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny rendered search index, built once per test module that asks for it (test_scoring and test_twostage
    define a `setup` of their own, which wins there) -> (root, data folder, checkpoint, index path, SearchIndex,
    exact scores (12 images, 60 captions)): a synthetic split (test: 12 rendered images, 8 regions of 32
    features), an untrained tiny tvrn_sgr saved as a checkpoint, its test-split index saved to root/test.index."""
    import torch

    from tvrn.data import Vocabulary
    from tvrn.data.synth import SynthConfig, write_dataset
    from tvrn.models import create_model
    from tvrn.scoring import score_all
    from tvrn.search import SearchIndex
    from tvrn.checkpoint import save_model

    root = tmp_path_factory.mktemp("search")
    data = root / "data"
    write_dataset(data, SynthConfig(seed=4, train_images=10, dev_images=2, test_images=12, regions=8,
                                    feature_dim=32, image_size=64))
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", img_dim=32, embed_size=16, sim_dim=8, word_dim=8, vocab_size=len(vocab))
    ckpt = root / "model.pt"
    save_model(ckpt, "tvrn_sgr", model, vocab)
    index = SearchIndex.build(ckpt, data, "test")
    path = root / "test.index"
    index.save(path)
    exact = score_all(index.model, index.enc_images, index.enc_texts)  # (12, 60)
    return root, data, ckpt, path, index, exact
