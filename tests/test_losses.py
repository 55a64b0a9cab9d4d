import math

import pytest
import torch

from tvrn.losses import ContrastiveLoss, contrastive_loss, contrastive_loss_parts, positive_mask

S = torch.tensor([[0.9, 0.5, 0.2], [0.4, 0.8, 0.7], [0.1, 0.6, 0.3]], dtype=torch.float64)
IDS = torch.tensor([0, 1, 2])


def test_positive_mask():
    m = positive_mask(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0, 1]))
    assert m.dtype == torch.bool
    assert m.tolist() == [[True, False, True, False], [True, False, True, False], [False, True, False, True]]


def test_max_violation_by_hand():
    # i2t rows: row1 worst 0.2+0.7-0.8=0.1, row2 worst 0.2+0.6-0.3=0.5; t2i col2 worst 0.2+0.7-0.3=0.6
    i2t, t2i = contrastive_loss_parts(S, positive_mask(IDS, IDS), 0.2, "max")
    assert torch.allclose(i2t, torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64))
    assert torch.allclose(t2i, torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64))
    assert ContrastiveLoss()(S, IDS).item() == pytest.approx(1.2)
    assert ContrastiveLoss(reduction="mean")(S, IDS).item() == pytest.approx(1.2 / 3)


def test_sum_by_hand():
    # col2: 0.1 (row0) + 0.6 (row1); rows as for max (one violating negative each)
    assert ContrastiveLoss(mode="sum")(S, IDS).item() == pytest.approx(0.1 + 0.5 + 0.1 + 0.6)


def test_smooth_by_hand():
    e = math.exp
    rows = [(-0.2, -0.5), (-0.2, 0.1), (0.0, 0.5)]  # violations per image row over its 2 negatives
    cols = [(-0.3, -0.6), (-0.1, 0.0), (0.1, 0.6)]  # per caption column over its 2 negative images
    want = sum(math.log(1 + e(a / 0.05) + e(b / 0.05)) for a, b in rows + cols)
    got = ContrastiveLoss(mode="smooth", tau=0.05)(S, IDS).item()
    assert got == pytest.approx(want, rel=1e-9)


def test_same_image_captions_are_not_negatives():
    # rows 0 and 1 are the same image (id 0): caption 1 is a positive of image row 0 and vice versa.
    s = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.5, 0.1], [0.1, 0.1, 0.5]])
    ids = torch.tensor([0, 0, 1])
    for mode in ("max", "sum"):
        assert contrastive_loss(s, ids, mode=mode).item() == 0.0
        # treating the duplicate as a negative would give a positive loss: the mask is what makes it 0
        assert contrastive_loss(s, None, mode=mode).item() > 0.5
    smooth_dup = contrastive_loss(s, ids, mode="smooth").item()
    smooth_nodup = contrastive_loss(s, None, mode="smooth").item()
    # every negative has violation 0.2 + 0.1 - 0.5 = -0.2; rows/columns 0, 1 have one negative, 2 has two
    want = 4 * math.log(1 + math.exp(-4)) + 2 * math.log(1 + 2 * math.exp(-4))
    assert smooth_dup == pytest.approx(want, rel=1e-5)  # float32 scores
    assert smooth_nodup > want + 1


@pytest.mark.parametrize("mode", ["max", "sum", "smooth"])
def test_gradient_flows(mode):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 6, generator=g).mul(0.3).requires_grad_()
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    loss = ContrastiveLoss(mode=mode)(s, ids)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    pos = positive_mask(ids, ids) & ~torch.eye(6, dtype=torch.bool)
    assert (s.grad[pos] == 0).all()  # same-image off-diagonal pairs get no gradient


def test_bad_inputs():
    with pytest.raises(ValueError):
        ContrastiveLoss(mode="nope")
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(2, 3))


@pytest.mark.parametrize("mode", ["max", "sum", "smooth"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_global_batch_parts_add_up_to_the_full_loss(mode, reduction):
    """Each "rank" sees its rows and columns of the (N, N) matrix; their parts sum to the loss of the whole."""
    from tvrn.losses import global_batch_loss_part

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 6, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])  # repeated images: positives for each other
    want = contrastive_loss(scores, ids, 0.2, mode, 0.05, reduction)
    parts = [global_batch_loss_part(scores[o:o + 3], scores[:, o:o + 3], o, ids[o:o + 3], ids, 0.2, mode, 0.05,
                                    reduction) for o in (0, 3)]
    assert float(sum(parts)) == pytest.approx(float(want), rel=1e-12)
