"""The training path's scores (tvrn.scoring.score_all_train) against the plain path: same scores, same
gradients, every model; only pairs with a gradient are recomputed, in chunks that fit the budget."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import MODELS, build, make_images, make_texts, pad_images, pad_texts
from tvrn.data.batch import PairBatch
from tvrn.losses import ContrastiveLoss
from tvrn.scoring import LAST_TRAIN_BACKWARD, score_all_train, train_grid_bytes, train_pair_bytes


def _double(images, texts):
    return replace(images, features=images.features.double()), texts


def _step(model, images, texts, blocked, weights=None, loss_mode=None, budget=0.02, seed=5, dense=False):
    """One forward + backward -> (scores, {param: grad}, (grad of the image / caption encodings))."""
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both paths
    ei, et = model.encode_image(images), model.encode_text(texts)
    for t in (ei.units if ei.units is not None else ei.regions, et.words):
        t.retain_grad()
    if blocked:
        S = score_all_train(model, ei, model.anchor_texts(ei, et), memory_budget_mb=budget, dense_gradient=dense)
    else:
        S = model.score(ei, et)
    if loss_mode is not None:
        loss = ContrastiveLoss(0.2, loss_mode)(S, torch.arange(len(images)) % 3)  # repeated images: positives
    else:
        loss = (S * weights).sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    enc_grads = tuple(t.grad.clone() for t in (ei.units if ei.units is not None else ei.regions, et.words))
    return S.detach(), grads, enc_grads


def _assert_grads_close(ref, got, rtol):
    assert set(ref) == set(got), set(ref) ^ set(got)
    for k in ref:
        scale = ref[k].norm()
        assert (ref[k] - got[k]).norm() <= rtol * scale + 1e-12, f"{k}: {(ref[k] - got[k]).norm()} vs {scale}"


@pytest.mark.parametrize("loss_mode", [None, "max"], ids=["dense", "hardest"])
@pytest.mark.parametrize("name", MODELS)
def test_blocked_scores_and_gradients_equal_the_plain_path(name, loss_mode):
    """float64, training mode with dropout, padded regions, mixed caption lengths, a budget so small that
    every chunk holds a pair or two: scores to 1e-10, every gradient to 1e-5 relative."""
    model = build(name, dropout=0.3).double().train()
    images, texts = _double(pad_images(make_images(5), 2), pad_texts(make_texts(model, 5, lengths=(7, 5, 3, 5, 2)), 1))
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    S0, g0, e0 = _step(model, images, texts, False, w, loss_mode)
    S1, g1, e1 = _step(model, images, texts, True, w, loss_mode)
    torch.testing.assert_close(S1, S0, atol=1e-10, rtol=0)
    assert g0, "no gradients at all"
    _assert_grads_close(g0, g1, 1e-5)
    for a, b in zip(e0, e1):  # gradients of the encodings too (what the encoders' backward receives)
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-6)


def test_blocked_gradients_in_float32_within_rounding():
    model = build("tvrn_sgr", dropout=0.1).train()
    images, texts = make_images(4), make_texts(model, 6, lengths=(7, 5, 3))
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    S0, g0, _ = _step(model, images, texts, False, w)
    S1, g1, _ = _step(model, images, texts, True, w)
    torch.testing.assert_close(S1, S0, atol=1e-6, rtol=0)
    total = torch.cat([g.flatten() for g in g0.values()]).norm()
    diff = torch.cat([(g0[k] - g1[k]).flatten() for k in g0]).norm()
    assert diff <= 1e-5 * total


class _Spy:
    """Wraps model.METHOD (score_pairs, or score_grid with measure="train_grid_bytes"): records (images, caption
    length, all words real, captions) of every recomputation; calls from MEASURE, which measures a pair or a
    2 x 2 grid, are not counted."""

    def __init__(self, model, monkeypatch, method="score_pairs", measure="train_pair_bytes"):
        import tvrn.scoring.train

        self.model, self.calls, self.inner, self.measuring = model, [], getattr(model, method), False
        setattr(model, method, self)
        inner_measure = getattr(tvrn.scoring.train, measure)

        def measured(*args):
            self.measuring = True
            try:
                return inner_measure(*args)
            finally:
                self.measuring = False

        monkeypatch.setattr(tvrn.scoring.train, measure, measured)

    def __call__(self, images, texts):
        if not self.measuring:
            self.calls.append((len(images), texts.words.shape[1], bool(texts.mask.all()), len(texts)))
        return self.inner(images, texts)


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_saf", "scan_t2i", "scan_i2t"])
def test_backward_recomputes_exactly_the_pairs_with_a_gradient_in_budgeted_chunks(name, monkeypatch):
    model = build(name).train()
    images, texts = make_images(6), make_texts(model, 8, lengths=(7, 5, 3, 6))
    torch.manual_seed(0)
    ei, et = model.encode_image(images), model.encode_text(texts)
    budget = 3 * train_pair_bytes(model, ei, et) / 2**20  # about three pairs of the longest length per chunk
    spy = _Spy(model, monkeypatch)
    S = score_all_train(model, ei, et, memory_budget_mb=budget)
    G = torch.zeros_like(S)
    pick = [(0, 0), (1, 3), (5, 7), (2, 2), (2, 6), (4, 1), (3, 5)]
    for i, j in pick:
        G[i, j] = 1.0 + i + j
    S.backward(G)
    calls = list(spy.calls)
    assert sum(p for p, _, _, _ in calls) == len(pick)  # nothing else recomputed
    for p, n, all_real, _ in calls:  # each chunk one caption length, cut to it, within the budget
        assert all_real and p * train_pair_bytes(model, ei, et.trim(n)) <= budget * 2**20 or p == 1
    assert len(calls) >= 3


def test_chunk_size_does_not_change_the_gradients():
    """float64: one chunk, a pair per chunk, a few pairs per chunk agree to rounding (1e-10)."""
    model = build("tvrn_saf").double().train()
    images, texts = _double(make_images(5), make_texts(model, 7, lengths=(7, 5, 3, 5, 2)))
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = _step(model, images, texts, True, w, budget=1000.0)[1]
    for budget in (0.001, 0.1):
        got = _step(model, images, texts, True, w, budget=budget)[1]
        _assert_grads_close(ref, got, 1e-10)


def test_no_pair_with_a_gradient_still_gives_pair_parameters_a_zero_gradient():
    """DDP (find_unused_parameters=False) expects a gradient for every parameter in every step."""
    model = build("tvrn_sgr").train()
    images, texts = make_images(3), make_texts(model, 3)
    ei, et = model.encode_image(images), model.encode_text(texts)
    score_all_train(model, ei, et, memory_budget_mb=1.0).backward(torch.zeros(3, 3))
    for k, p in model.named_parameters():
        assert p.grad is not None and not p.grad.abs().sum() > 0, k


def test_dense_gradient_keeps_the_grid_graph_only_when_it_fits(monkeypatch):
    """With a dense gradient, score_grid once per caption length (cut to it) with its graph kept when what it saves
    for all pairs fits the budget; recomputation otherwise (here in grid blocks: every pair has a gradient).
    The plain path would need more."""
    from tvrn.scoring.train import _kept_bytes

    model = build("sgraf_sgr").train()
    images, texts = make_images(4), make_texts(model, 4, lengths=(7, 5, 3, 5))
    ei, et = model.encode_image(images), model.encode_text(texts)
    need = _kept_bytes(model, ei, et, grid=True)
    assert need < _kept_bytes(model, ei, et, grid=False)
    pairs, grids = _Spy(model, monkeypatch), _Spy(model, monkeypatch, "score_grid", "train_grid_bytes")
    fits = score_all_train(model, ei, et, memory_budget_mb=1.01 * need / 2**20, dense_gradient=True)
    assert fits.grad_fn.name() != "_TrainScoresBackward"
    assert sorted((a, n, b) for a, n, _, b in grids.calls) == [(4, 3, 1), (4, 5, 2), (4, 7, 1)]  # no padded word
    fits.sum().backward(retain_graph=True)
    assert pairs.calls == [] and len(grids.calls) == 3  # plain autograd, nothing recomputed
    grids.calls.clear()
    ei, et = model.encode_image(images), model.encode_text(texts)
    tight = score_all_train(model, ei, et, memory_budget_mb=0.99 * need / 2**20, dense_gradient=True)
    assert tight.grad_fn.name() == "_TrainScoresBackward" and grids.calls == []
    tight.sum().backward()
    assert pairs.calls == [] and LAST_TRAIN_BACKWARD["grid_pairs"] == 16  # every length dense: grid blocks


def test_dense_gradient_takes_the_plain_path_when_it_fits_for_models_without_a_grid(monkeypatch):
    from tvrn.scoring.train import _kept_bytes

    model = build("scan_t2i").train()
    images, texts = make_images(4), make_texts(model, 4, lengths=(7, 5, 3, 5))
    ei, et = model.encode_image(images), model.encode_text(texts)
    assert _kept_bytes(model, ei, et, grid=True) is None
    need = _kept_bytes(model, ei, et, grid=False)
    assert need < 16 * train_pair_bytes(model, ei, et)  # shorter captions are counted at their length
    calls = []
    inner = model.score
    monkeypatch.setattr(model, "score", lambda i, t: calls.append(t.words.shape) or inner(i, t))
    spy = _Spy(model, monkeypatch)
    fits = score_all_train(model, ei, et, memory_budget_mb=1.01 * need / 2**20, dense_gradient=True)
    assert fits.grad_fn.name() != "_TrainScoresBackward"
    assert sorted(shape[1] for shape in calls) == [3, 5, 7]  # one call per length, no padded word
    fits.sum().backward()
    assert spy.calls == []
    ei, et = model.encode_image(images), model.encode_text(texts)
    tight = score_all_train(model, ei, et, memory_budget_mb=0.99 * need / 2**20, dense_gradient=True)
    assert tight.grad_fn.name() == "_TrainScoresBackward"
    tight.sum().backward()
    assert sum(p for p, _, _, _ in spy.calls) == 16  # recomputed pair by pair


def test_grid_bytes_are_affine_in_the_block_and_blocks_fit_the_budget():
    """train_grid_bytes(ni, nt) = d + a ni + b nt + c ni nt predicts what a 3 x 4 grid saves (measured) within
    rounding of the measurement, and grid_blocks returns the largest block within a budget."""
    from tvrn.scoring.train import _measure_saved_bytes, grid_blocks

    model = build("tvrn_sgr").train()
    images, texts = make_images(3), make_texts(model, 4, lengths=(5,))
    ei, et = model.encode_image(images), model.encode_text(texts)
    measured = _measure_saved_bytes(lambda i, t: model.score_grid(i, t), model, ei, et)
    assert abs(train_grid_bytes(model, ei, et, 3, 4) - measured) <= 0.02 * measured
    assert train_grid_bytes(model, ei, et, 3, 4) < 12 * train_grid_bytes(model, ei, et)  # shared image side
    budget = train_grid_bytes(model, ei, et, 2, 3) + 1
    bi, bt = grid_blocks(model, ei, et, 10, 3, budget)
    assert (bi, bt) == (2, 3)
    assert grid_blocks(model, ei, et, 10, 3, 1.0) == (1, 1)


def test_score_by_length_equals_one_padded_call():
    from tvrn.scoring import score_by_length

    model = build("tvrn_sgr").train()
    images, texts = make_images(3), make_texts(model, 5, lengths=(7, 2, 5, 2, 4))
    torch.manual_seed(0)
    ei, et = model.encode_image(images), model.encode_text(texts)
    torch.testing.assert_close(score_by_length(model, ei, et), model.score(ei, et), atol=1e-6, rtol=0)


def test_model_forward_with_a_budget_trains_like_the_plain_path(tmp_path):
    """Three trainer steps on TVRN with the blocked path and with the plain one end with the same weights
    (float rounding apart): the Trainer wiring, the hardest-negative loss and Adam included. float64: Adam
    turns float32 rounding of near-zero gradients into full-size steps of lr."""
    from tvrn.train import Trainer, TrainConfig

    def batches(model):
        out = []
        for k in range(3):
            images, texts = _double(make_images(6, seed=10 + k), make_texts(model, 6, seed=20 + k, lengths=(7, 4, 6)))
            out.append(PairBatch(images, texts, torch.tensor([0, 1, 2, 3, 4, 0]) + 10 * k))
        return out

    weights = []
    for budget in (None, 0.05):
        torch.manual_seed(0)
        model = build("tvrn_sgr", dropout=0.2).double().train()
        data = batches(model)
        cfg = TrainConfig(epochs=1, batch_size=6, lr=1e-3, out_dir=str(tmp_path / str(budget)), tensorboard=False,
                          memory_budget_mb=budget, loss_mode="max", patience=0)
        Trainer(model, cfg, loader_factory=lambda epoch: data).fit()
        weights.append(model.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=1e-9, rtol=1e-7)


def test_score_path_follows_the_gradient_density():
    from tvrn.train.task import ScorePath

    path = ScorePath(64.0, sparse_loss=True)
    assert path.forward_kwargs(warmup=False) == {"memory_budget_mb": 64.0, "dense_gradient": False}
    assert path.forward_kwargs(warmup=True)["dense_gradient"]  # the sum loss of the warm-up epochs
    s = torch.zeros(4, 4, requires_grad=True)
    path.watch(s)
    g = torch.zeros(4, 4)
    g[:2] = 1.0  # half of the pairs get a gradient
    s.backward(g)
    assert path.density == 0.5 and path.forward_kwargs(warmup=False)["dense_gradient"]
    assert ScorePath(None, sparse_loss=True).forward_kwargs(False) == {"memory_budget_mb": None}  # the plain path


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_sgr", "scan_t2i"])
def test_blocked_path_under_bf16_autocast(name):
    """The accelerator recipe on the CPU: forward under autocast (bf16), backward outside it, as AMP training
    does; the recomputation must replay the forward's autocast (the encodings mix bf16 regions and fp32 words).
    Gradients are finite and agree with the plain path under the same autocast to 2% (both are 3-15% from fp32
    at these tiny sizes: bf16 keeps 8 bits of mantissa; measured 0.3-0.5% between the two paths)."""
    model = build(name, dropout=0.0).train()
    images, texts = make_images(4), make_texts(model, 4)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(4))

    def step(blocked):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ei, et = model.encode_image(images), model.encode_text(texts)
            S = score_all_train(model, ei, et, memory_budget_mb=1.0) if blocked else model.score(ei, et)
        (S.float() * w).sum().backward()  # outside autocast
        return S.float().detach(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}

    S, got = step(True)
    S0, ref = step(False)
    assert torch.isfinite(S).all()
    torch.testing.assert_close(S, S0, atol=2e-2, rtol=0)
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    assert set(got) == set(ref) and torch.isfinite(flat(got)).all()
    assert (flat(got) - flat(ref)).norm() <= 0.02 * flat(ref).norm()


GRID_MODELS = ["tvrn_sgr", "tvrn_saf", "sgraf_sgr", "sgraf_saf", "tvrn_sgr_published", "tvrn_saf_published"]


@pytest.mark.parametrize("refine", ["pair", "first_image"])
@pytest.mark.parametrize("name", GRID_MODELS)
def test_score_grid_equals_the_inference_fast_path(name, refine):
    """model.score_grid (the training recomputation of dense gradients: the fast path's equations out of place,
    differentiable) against model.score's inference fast path, float64, padded regions, each caption length:
    1e-12; and it builds a graph."""
    model = build(name).double().eval()
    if refine == "first_image":
        if not model.config.refine_text:
            pytest.skip("no module 2")
        model.config.refine_against = "first_image"
    padded = "published" not in name  # the published BatchNorm pooling takes no padded regions
    images = make_images(4) if not padded else pad_images(make_images(4), 2)
    images, texts = _double(images, make_texts(model, 6, lengths=(7, 5, 3)))
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        et = model.anchor_texts(ei, et)
    for n in (7, 5, 3):
        cols = torch.nonzero(et.mask.sum(1) == n).reshape(-1)
        txt = et[cols].trim(n)
        with torch.no_grad():
            fast = model.score(model.inference_encodings(ei), txt)  # (4, 2)
        grid = model.score_grid(ei, txt)
        assert grid.shape == (4, 2) and grid.requires_grad
        torch.testing.assert_close(grid.detach(), fast, atol=1e-12, rtol=0)


def test_dense_lengths_are_recomputed_in_grid_blocks_and_sparse_ones_pair_by_pair(monkeypatch):
    """A gradient dense on the captions of length 5 and on two pairs elsewhere: the length-5 columns go through
    score_grid in blocks within the budget, the two pairs through score_pairs; the gradients equal the plain
    path's (float64, 1e-10 on the encodings, 1e-9 relative on the parameters)."""
    model = build("tvrn_sgr", dropout=0.2).double().train()
    images, texts = _double(pad_images(make_images(6), 1), make_texts(model, 9, lengths=(7, 5, 3)))
    w = torch.zeros(6, 9, dtype=torch.float64)
    w[:, 1::3] = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)  # length 5
    w[0, 0], w[4, 8] = 0.7, -1.3  # lengths 7 and 3: 1 of 12 pairs each
    S0, g0, e0 = _step(model, images, texts, False, w)
    torch.manual_seed(5)
    ei, et = model.encode_image(images), model.encode_text(texts)
    budget = 4 * train_grid_bytes(model, ei, et.trim(5)[1::3]) / 2**20  # four pairs per block
    pairs, grids = _Spy(model, monkeypatch), _Spy(model, monkeypatch, "score_grid", "train_grid_bytes")
    S1, g1, e1 = _step(model, images, texts, True, w, budget=budget)
    torch.testing.assert_close(S1, S0, atol=1e-10, rtol=0)
    assert sorted((p, n) for p, n, _, _ in pairs.calls) == [(1, 3), (1, 7)]
    assert {n for _, n, _, _ in grids.calls} == {5} and sum(a * b for a, _, _, b in grids.calls) == 18
    assert all(a * b <= 4 for a, _, _, b in grids.calls) and len(grids.calls) >= 5
    assert LAST_TRAIN_BACKWARD["grid_pairs"] == 18 and LAST_TRAIN_BACKWARD["pairs"] == 20
    _assert_grads_close(g0, g1, 1e-9)
    for a, b in zip(e0, e1):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("refine", ["pair", "first_image"])
@pytest.mark.parametrize("name", GRID_MODELS)
def test_kept_grid_graph_gives_the_plain_paths_gradients(name, refine):
    """A dense gradient with a budget that holds every pair: score_grid's graph is kept (nothing recomputed) and
    scores and gradients equal model.score's plain path (float64, dropout, mixed lengths): 1e-10 / 1e-9 relative."""
    model = build(name, dropout=0.3).double().train()
    if refine == "first_image":
        if not model.config.refine_text:
            pytest.skip("no module 2")
        model.config.refine_against = "first_image"
    images, texts = _double(make_images(5), make_texts(model, 6, lengths=(7, 5, 3, 5, 2, 7)))
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    S0, g0, e0 = _step(model, images, texts, False, w)
    LAST_TRAIN_BACKWARD.clear()
    S1, g1, e1 = _step(model, images, texts, True, w, budget=1000.0, dense=True)
    assert LAST_TRAIN_BACKWARD == {}  # no recomputation ran
    torch.testing.assert_close(S1, S0, atol=1e-10, rtol=0)
    _assert_grads_close(g0, g1, 1e-9)
    for a, b in zip(e0, e1):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["tvrn_sgr", "scan_t2i", "vse"])
def test_model_call_with_gradients_is_bounded_by_default_and_plain_only_when_asked(name, monkeypatch):
    """model(images, texts) with gradients goes through score_all_train (blocks of memory_budget_mb, recomputed in
    backward) unless memory_budget_mb=None asks for the plain path; both give the same scores and gradients
    (float64). VSE, whose pair work is one matmul, always takes the plain path."""
    import tvrn.models.base as base

    calls = []
    real = base.score_all_train
    monkeypatch.setattr(base, "score_all_train", lambda *a, **k: calls.append(k["memory_budget_mb"]) or real(*a, **k))
    model = build(name).double().train()
    images, texts = _double(make_images(4), make_texts(model, 4, lengths=(5, 3, 5, 2)))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for budget in ({}, {"memory_budget_mb": None}):
        model.zero_grad()
        torch.manual_seed(0)
        S = model(images, texts, **budget)
        (S * w).sum().backward()
        grads.append((S.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert calls == ([] if name == "vse" else [512.0])  # the default budget; None: not called
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=0)
    _assert_grads_close(grads[1][1], grads[0][1], 1e-9)
