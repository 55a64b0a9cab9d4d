"""Two-stage search mechanics on an untrained tiny TVRN: k = whole gallery equals exact; a ground truth outside
the shortlist is a miss; the auxiliary shortlist loss reaches the shortlist parameters."""
import math

import pytest
import torch

from helpers import build, make_images, make_texts
from tvrn.evaluation import evaluate
from tvrn.metrics import i2t_ranks, t2i_ranks
from tvrn.scoring import score_all
from tvrn.search import evaluate_two_stage, topk_exact, topk_indices, two_stage_scores

NI, NT = 6, 12


@pytest.fixture(scope="module")
def setup():
    model = build("tvrn_sgr")
    images = make_images(NI)
    texts = make_texts(model, NT, lengths=(7, 5, 3, 6))
    c2i = torch.arange(NT) // 2  # two captions per image
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
    return model, ei, et, c2i, score_all(model, ei, et)


def test_topk_exact_matches_sort():
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(7, 5, generator=g), torch.randn(30, 5, generator=g)
    ref = torch.argsort(q @ x.T, dim=1, descending=True)[:, :4]
    assert torch.equal(topk_exact(q, x, 4, chunk=3), ref)
    assert torch.equal(topk_indices(q, x, 4, use_faiss=False), ref)


def test_faiss_topk_equals_exact_and_two_stage_agrees(setup):
    """FAISS (IndexFlatIP, installed by the dev extra) gives the exact top-k, and two-stage scores are the same
    with either shortlist backend."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1)
    assert torch.equal(topk_indices(q, x, 12, use_faiss=True), topk_exact(q, x, 12))
    assert topk_indices(q, x, 900, use_faiss=True).shape == (40, 500)  # k beyond the gallery: the whole gallery
    model, ei, et, c2i, exact = setup
    a = two_stage_scores(model, ei, et, k_images=2, k_texts=3, use_faiss=True)
    b = two_stage_scores(model, ei, et, k_images=2, k_texts=3, use_faiss=False)
    assert torch.equal(a["t2i"], b["t2i"]) and torch.equal(a["i2t"], b["i2t"])


def test_full_shortlist_equals_exact(setup):
    model, ei, et, c2i, exact = setup
    r = two_stage_scores(model, ei, et, k_images=NI, k_texts=NT)
    assert r["fraction"] == 1.0
    torch.testing.assert_close(r["t2i"], exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(r["i2t"], exact, atol=1e-6, rtol=0)
    row = evaluate_two_stage(model, ei, et, c2i, [(NI, NT)], exact_scores=exact)[0]
    ref = evaluate(exact, c2i)
    assert row["rsum"] == pytest.approx(ref["rsum"]) and row["rsum_gap"] == pytest.approx(0.0)
    assert row["t2i/meanr"] == pytest.approx(ref["t2i/meanr"])


def test_shortlist_restricts_each_direction_and_misses_count(setup):
    model, ei, et, c2i, exact = setup
    r = two_stage_scores(model, ei, et, k_images=2, k_texts=3)
    t2i, i2t = r["t2i"], r["i2t"]
    assert (torch.isfinite(t2i).sum(0) == 2).all() and (torch.isfinite(i2t).sum(1) == 3).all()
    assert r["pairs_scored"] == int((torch.isfinite(t2i) | torch.isfinite(i2t)).sum()) < NI * NT
    finite = torch.isfinite(t2i)
    torch.testing.assert_close(t2i[finite], exact[finite], atol=1e-6, rtol=0)  # re-ranked with the full score
    gi, gt = model.shortlist_embed_image(ei), model.shortlist_embed_text(et)
    short = topk_exact(gt, gi, 2)  # (Nt, 2)
    outside = ~(short == c2i[:, None]).any(1)  # captions whose image is not shortlisted
    ranks = t2i_ranks(t2i, c2i)
    assert (ranks[outside] > 2).all() and (ranks[~outside] <= 2).all()
    # a hand-made case: ground truth outside the shortlist is a miss, never rank 1
    s = torch.full((3, 3), -math.inf)
    s[1, 0], s[2, 0] = 0.9, 0.8  # caption 0's image (0) not shortlisted
    assert t2i_ranks(s, torch.tensor([0, 1, 2]))[0] == 3
    assert i2t_ranks(s, torch.tensor([0, 1, 2]))[1] > 1


def test_shortlist_loss_reaches_the_shortlist_parameters():
    model = build("tvrn_sgr").train()
    images, texts = make_images(), make_texts(model)
    scores, short = model(images, texts, return_shortlist=True)
    assert scores.shape == short.shape == (3, 3)
    short.sum().backward()
    assert model.text_pool.local.weight.grad is not None and model.image_pool.local.weight.grad is not None
