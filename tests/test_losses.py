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


# ---- "published": the TVRN authors' loss -------------------------------------------------------------------

def _published_loop(s, margin=0.2, tau=0.05, ids=None, group_t2i_by="row"):
    """The published loss written out with Python loops (float64 scalars), not calling tvrn. Image i as query:
    cost_s[i, j] = max(0, m + S[i, j] - S[i, i]); caption j as query: cost_im[i, j] = max(0, m + S[i, j] -
    S[j, j]); both 0 on the diagonal (the target logit). loss = (CE(cost_im / T) + CE(cost_s / T)) / 2 with
    CE(X) = mean over rows i of (log sum_j exp X[i, j] - X[i, i]). ids: (i, j) with i != j and the same id are
    left out of the sums. group_t2i_by="col" sums cost_im over the columns instead (the wrong grouping)."""
    b = s.shape[0]
    zero = s.new_zeros(())

    def cost_s(i, j):
        return zero if i == j else torch.clamp(margin + s[i, j] - s[i, i], min=0)

    def cost_im(i, j):
        return zero if i == j else torch.clamp(margin + s[i, j] - s[j, j], min=0)

    def kept(i, j):
        return i == j or ids is None or ids[i] != ids[j]

    def ce(x):  # x(r, k): entry k of row r; the target is k == r
        total = zero
        for r in range(b):
            total = total + torch.log(sum(torch.exp(x(r, k) / tau) for k in range(b) if kept(r, k))) - x(r, r) / tau
        return total / b

    t2i = ce(cost_im) if group_t2i_by == "row" else ce(lambda r, k: cost_im(k, r))
    return (t2i + ce(cost_s)) / 2


def _grad(loss, s):
    if not loss.requires_grad:  # B = 1: the loop's loss is the constant log(exp(0))
        return torch.zeros_like(s)
    (g,) = torch.autograd.grad(loss, s, retain_graph=True, allow_unused=True)
    return torch.zeros_like(s) if g is None else g


@pytest.mark.parametrize("b", [1, 2, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_published_equals_the_formula_value_and_gradient(b, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(b, b, generator=g, dtype=torch.float64) * 0.6).requires_grad_()
    with torch.no_grad():
        s.diagonal().add_(0.4)  # many negatives satisfy the margin: clamped entries exist next to violations
    want = _published_loop(s)
    got = contrastive_loss(s, None, 0.2, "published", 0.05, "mean", exclude_same_image=False)
    assert got.item() == pytest.approx(want.item(), abs=1e-12, rel=1e-12)
    assert torch.allclose(_grad(got, s), _grad(want, s), rtol=0, atol=1e-12)
    if b == 7:  # the matrix has both clamped and violating negatives
        v = 0.2 + s.detach() - s.detach().diagonal().reshape(-1, 1)
        off = ~torch.eye(b, dtype=torch.bool)
        assert (v[off] < 0).any() and (v[off] > 0).any()
    if b == 1:
        assert got.item() == 0.0  # only the target: log(exp(0)) = 0


def test_published_by_hand():
    # S = [[a, b], [c, d]]: cost_s rows 0.2+b-a = 0.1 and 0.2+c-d = -0.2 -> 0; cost_im rows (per image i)
    # 0.2+S[0,1]-S[1,1] = 0.3 and 0.2+S[1,0]-S[0,0] = -0.4 -> 0. A clamped negative adds exp(0) = 1.
    s = torch.tensor([[0.7, 0.6], [0.1, 0.5]], dtype=torch.float64)
    e, log = math.exp, math.log
    i2t = (log(1 + e(0.1 / 0.05)) + log(1 + e(0))) / 2
    t2i = (log(1 + e(0.3 / 0.05)) + log(1 + e(0))) / 2
    want = (t2i + i2t) / 2
    got = contrastive_loss(s, None, mode="published", reduction="mean", exclude_same_image=False).item()
    assert got == pytest.approx(want, rel=1e-14)
    assert ContrastiveLoss(mode="published", reduction="mean")(s).item() == pytest.approx(want, rel=1e-14)


def test_published_all_margins_satisfied_is_the_log_b_floor_and_differs_from_smooth():
    b = 5
    s = torch.full((b, b), 0.1, dtype=torch.float64)
    s.diagonal().fill_(0.9)  # every violation 0.2 + 0.1 - 0.9 = -0.6: every margin satisfied
    s.requires_grad_()
    pub = contrastive_loss(s, None, mode="published", reduction="mean", exclude_same_image=False)
    assert pub.item() == pytest.approx(math.log(b), rel=1e-14)  # each row: log(1 + (B - 1) exp(0))
    assert (_grad(pub, s) == 0).all()  # clamped entries: no gradient
    smooth = contrastive_loss(s, None, mode="smooth", reduction="mean") / 2  # same scale as published
    assert smooth.item() < 1e-3  # unclamped: exp(-0.6 / 0.05) per negative
    assert abs(pub.item() - smooth.item()) > 1.0


def test_published_t2i_term_is_grouped_by_image_rows():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(5, 5, generator=g, dtype=torch.float64)
    by_row = _published_loop(s).item()
    by_col = _published_loop(s, group_t2i_by="col").item()
    assert abs(by_row - by_col) > 1e-2  # the grouping matters: a per-caption grouping would be caught
    got = contrastive_loss(s, None, mode="published", reduction="mean", exclude_same_image=False).item()
    assert got == pytest.approx(by_row, rel=1e-12)
    i2t, t2i = contrastive_loss_parts(s, torch.eye(5, dtype=torch.bool), mode="published")
    assert ((i2t.mean() + t2i.mean()) / 2).item() == pytest.approx(by_row, rel=1e-12)


def test_published_same_image_exclusion_switch():
    g = torch.Generator().manual_seed(4)
    s = torch.rand(6, 6, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    on = contrastive_loss(s, ids, mode="published", reduction="mean")  # tvrn's default: exclusion on
    want_on = _published_loop(s, ids=ids.tolist())
    assert on.item() == pytest.approx(want_on.item(), rel=1e-12)
    assert torch.allclose(_grad(on, s), _grad(want_on, s), rtol=0, atol=1e-12)
    pos = positive_mask(ids, ids) & ~torch.eye(6, dtype=torch.bool)
    assert (_grad(on, s)[pos] == 0).all()  # excluded entries are absent: no gradient
    off = contrastive_loss(s, ids, mode="published", reduction="mean", exclude_same_image=False)
    none = contrastive_loss(s, None, mode="published", reduction="mean", exclude_same_image=False)
    assert off.item() == pytest.approx(none.item(), rel=1e-14)
    assert off.item() == pytest.approx(_published_loop(s).item(), rel=1e-12)
    assert abs(on.item() - off.item()) > 1e-3
    assert ContrastiveLoss(mode="published", reduction="mean", exclude_same_image=False)(s, ids).item() == \
        pytest.approx(off.item(), rel=1e-14)


@pytest.mark.parametrize("mode", ["max", "sum", "smooth"])
def test_exclusion_off_makes_only_the_diagonal_positive(mode):
    s = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.5, 0.1], [0.1, 0.1, 0.5]])
    ids = torch.tensor([0, 0, 1])
    off = contrastive_loss(s, ids, mode=mode, exclude_same_image=False)
    assert off.item() == contrastive_loss(s, None, mode=mode).item()
    assert off.item() > contrastive_loss(s, ids, mode=mode).item() + 0.5


def test_published_reduction_sum_is_b_times_mean():
    g = torch.Generator().manual_seed(5)
    s = torch.rand(7, 7, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4])
    for excl in (True, False):
        mean = contrastive_loss(s, ids, mode="published", reduction="mean", exclude_same_image=excl).item()
        total = contrastive_loss(s, ids, mode="published", reduction="sum", exclude_same_image=excl).item()
        assert total == pytest.approx(7 * mean, rel=1e-14)


@pytest.mark.parametrize("mode", ["max", "sum", "smooth", "published"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_parts_with_positives_add_up_value_and_gradient(mode, reduction, exclude, world):
    """Hand-made DDP split: rank r gets rows S[local], cols S[:, local] and the gathered diagonal; the sum of the
    parts equals the loss of the whole (N, N) matrix, in value and in the gradient w.r.t. S."""
    from tvrn.losses import global_batch_loss_part

    g = torch.Generator().manual_seed(6)
    n = 6
    s = (torch.rand(n, n, generator=g, dtype=torch.float64) * 0.6).requires_grad_()
    with torch.no_grad():
        s.diagonal().add_(0.3)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    want = contrastive_loss(s, ids, 0.2, mode, 0.05, reduction, exclude_same_image=exclude)
    b = n // world
    loss_fn = ContrastiveLoss(0.2, mode, 0.05, reduction, exclude_same_image=exclude)
    parts = []
    for o in range(0, n, b):
        positives_all = s.diagonal()  # what the caller gathers with autograd
        parts.append(global_batch_loss_part(s[o:o + b], s[:, o:o + b], o, ids[o:o + b], ids, 0.2, mode, 0.05,
                                            reduction, exclude, positives_all=positives_all))
        via_module = loss_fn.global_part(s[o:o + b], s[:, o:o + b], o, ids[o:o + b], ids,
                                         positives_all=positives_all)
        assert via_module.item() == parts[-1].item()
    got = sum(parts)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(_grad(got, s), _grad(want, s), rtol=1e-10, atol=1e-12)


def test_published_global_part_needs_the_gathered_positives():
    from tvrn.losses import global_batch_loss_part

    s = torch.rand(4, 4, dtype=torch.float64)
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="gathered positives"):
        global_batch_loss_part(s[:2], s[:, :2], 0, ids[:2], ids, mode="published")
    with pytest.raises(ValueError, match="gathered positives"):
        ContrastiveLoss(mode="published").global_part(s[:2], s[:, :2], 0, ids[:2], ids)
