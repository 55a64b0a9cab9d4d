"""Plain helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import torch


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
