"""TVRN as the authors' released code computes it (docs/published-tvrn.md): the model options A-E on small cases
written out here, the block rules of first-image refinement, training through it, and the registered names and
presets. The converter and the published evaluation against the float64 transcription of their computation
(tests/official_tvrn.py) are in tests/test_published_convert.py."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tvrn.config import list_presets
from tvrn.models import create_model, list_models
from tvrn.models.layers import Attention, attention_weights, l2norm
from tvrn.pipeline import published_adjacency_source, resolve_config
from tvrn.scoring import score_all
from helpers import B, R, TINY, make_images, make_texts  # noqa: F401  (shared tiny sizes and inputs)

PUB = dict(TINY, image_pool_tokens=2 * R)


def published(name="tvrn_sgr_published", **kw):
    torch.manual_seed(0)
    return create_model(name, **{**PUB, **kw}).double().eval()


def encodings(model, ni=7, nt=9, seed=1):
    images = make_images(ni, R, seed=seed).to(dtype=torch.float64)
    texts = make_texts(model, nt, seed=seed + 1, lengths=(7, 5, 3, 4))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


# ------------------------------------------------------------------------------------------------ A, B: spatial
def test_published_spatial_score_divides_by_the_key_norm_at_the_query_index():
    torch.manual_seed(3)
    att = Attention(6, 9.0, score="published").double()
    V = torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    q, k = att.q(V), att.k(V)
    s = torch.empty(2, 4, 4, dtype=torch.float64)
    for b in range(2):
        for j in range(4):  # query j
            for i in range(4):  # source i
                s[b, j, i] = (k[b, i] @ q[b, j]) / (max(q[b, j].norm(), 1e-8) * max(k[b, j].norm(), 1e-8))
    want = l2norm(attention_weights(s, mask, 9.0) @ V)
    torch.testing.assert_close(att(V, V, mask), want, rtol=0, atol=1e-12)
    cosine = Attention(6, 9.0, cosine=True).double()
    cosine.load_state_dict(att.state_dict())
    assert (cosine(V, V, mask) - want).abs().max() > 1e-3  # the cosine is another function


def test_multiplying_adjacency_keeps_weight_on_regions_that_do_not_overlap():
    """B: a non-adjacent region's score is multiplied by 0, so it keeps softmax weight exp(0) / Z; the designed
    mask gives it none."""
    torch.manual_seed(4)
    att = Attention(6, 9.0, score="published").double()
    V = torch.randn(1, 3, 6, dtype=torch.float64)
    adj = torch.tensor([[[1, 1, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    ones = torch.ones(1, 3, 3, dtype=torch.bool)
    out_mult = att(V, V, ones, weight=adj.double())
    out_mask = att(V, V, adj)
    # region 2 only overlaps itself: with the mask it attends to itself alone
    torch.testing.assert_close(out_mask[0, 2], l2norm(V[0, 2]), rtol=0, atol=1e-12)
    # multiplied: logits of regions 0 and 1 are exactly 0 for query 2, so its output is a mix of all three
    q, k = att.q(V)[0], att.k(V)[0]
    r = (q @ k.t()) / (q.norm(dim=-1).clamp_min(1e-8) * k.norm(dim=-1).clamp_min(1e-8))[:, None]
    s = torch.nn.functional.leaky_relu(r * adj[0].double(), 0.1)
    s = s / (s.norm(dim=0, keepdim=True) + 1e-8)  # l2 across the queries
    w = torch.softmax(9.0 * s, -1)
    assert w[2, 0] > 1e-6 and w[2, 0] == w[2, 1]  # exp(0) / Z each
    torch.testing.assert_close(out_mult[0], l2norm(w @ V[0]), rtol=0, atol=1e-12)
    assert (out_mult[0, 2] - out_mask[0, 2]).abs().max() > 1e-7


# ------------------------------------------------------------------------------------------------ D: one pair
def test_shared_attention_is_one_parameter_pair_trained_as_one():
    model = published()
    assert model.relational is model.text_context is model.expand
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith("q.weight") and not n.startswith("spatial") for n in names) == 1  # one tensor, three uses
    sd = model.state_dict()  # every use keeps its name, so designed checkpoints' names still apply
    assert sd["relational.q.weight"].data_ptr() == sd["expand.q.weight"].data_ptr() == sd["text_context.q.weight"].data_ptr()
    designed = create_model("tvrn_sgr", **PUB)
    assert designed.relational is not designed.expand
    # a training step moves the shared tensor once, by the sum of its three uses' gradients
    model.train()
    images, texts = make_images(3, R).to(dtype=torch.float64), make_texts(model, 3)
    model(images, texts).sum().backward()
    assert model.relational.q.weight.grad is not None and model.relational.q.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ E: first image
@pytest.mark.parametrize("name", ["tvrn_sgr_published", "tvrn_saf_published"])
def test_first_image_refinement_fast_path_plain_path_and_per_pair_rows(name):
    model = published(name)
    ei, et = encodings(model)
    with torch.no_grad():
        per_pair = model.score(ei, et)  # (Ni, Nt)
        model.config.refine_against = "first_image"
        first = model.score(ei, et)
        plain = model._score_plain(ei, model.anchor_texts(ei, et))
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-12)  # fast path == plain equations
    torch.testing.assert_close(first[0], per_pair[0], rtol=0, atol=1e-12)  # image 0 is refined against itself
    assert (first[1:] - per_pair[1:]).abs().max() > 1e-4  # the others are not
    # every caption refined once against image 0: scoring images 1.. with the anchored captions equals the block
    with torch.no_grad():
        anchored = model.anchor_texts(ei, et)
        torch.testing.assert_close(model.score(ei[3:], anchored), first[3:], rtol=0, atol=1e-12)


def test_first_image_scores_depend_on_the_block_and_score_all_uses_fixed_groups():
    model = published(refine_against="first_image", refine_group=3)
    ei, et = encodings(model, ni=8, nt=11)
    with torch.no_grad():
        groups = torch.cat([model.score(ei[g:g + 3], et) for g in range(0, 8, 3)])  # images 0-2, 3-5, 6-7
        for budget in (None, 0.01, 512.0):  # the memory budget sizes caption blocks only
            got = score_all(model, ei, et, memory_budget_mb=budget, block_images=5, block_texts=4, out_dtype=torch.float64)
            torch.testing.assert_close(got, groups, rtol=0, atol=1e-12)
        # permuting images inside a group, its first image kept, permutes the rows; moving the first one changes them
        perm = torch.tensor([0, 2, 1, 3, 5, 4, 6, 7])
        got = score_all(model, ei[perm], et, out_dtype=torch.float64)
        torch.testing.assert_close(got, groups[perm], rtol=0, atol=1e-12)
        swapped = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])
        got = score_all(model, ei[swapped], et, out_dtype=torch.float64)
        assert (got[:3] - groups[swapped][:3]).abs().max() > 1e-4
        # a caption's score does not depend on the other captions (caption blocks and order are free)
        cperm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(score_all(model, ei, et[cperm], block_texts=2, out_dtype=torch.float64),
                                   groups[:, cperm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("refine", ["pair", "first_image"])
def test_published_training_scores_and_gradients_budgeted_equal_plain(refine):
    """The training forward (first image of the batch) through the budgeted scorer, which recomputes the pairs
    with a gradient, against the plain path with autograd; a dense loss (every pair a gradient)."""
    model = published(refine_against=refine, dropout=0.0, word_dropout=0.0).train()
    images, texts = make_images(5, R, seed=5).to(dtype=torch.float64), make_texts(model, 5, seed=6, lengths=(7, 5, 3))
    grads, scores = [], []
    for budget in (None, 0.05):
        model.zero_grad()
        s = model(images, texts, memory_budget_mb=budget)  # (B, B)
        (s * torch.linspace(-1, 1, 25, dtype=torch.float64).view(5, 5)).sum().backward()
        scores.append(s.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=1e-10)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-9, msg=n)
    if refine == "first_image":  # the batch's first image: row 0 equals per-pair refinement (train-mode BatchNorm
        model.config.refine_against = "pair"  # statistics of the same batch, no dropout)
        with torch.no_grad():
            torch.testing.assert_close(model(images, texts)[0], scores[0][0], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------ F
def test_published_adjacency_source_is_the_last_batch_of_captions():
    c2i = torch.arange(20).repeat_interleave(5)  # 20 images x 5 captions
    src = published_adjacency_source(c2i, 20, shard=10)
    assert src.tolist() == [18] * 5 + [19] * 5 + [18] * 5 + [19] * 5  # image (90 + k) // 5 for k of each shard
    with pytest.raises(ValueError, match="multiples of 10"):
        published_adjacency_source(c2i[:95], 20, shard=10)
    with pytest.raises(ValueError, match="multiples of 100"):
        published_adjacency_source(c2i, 20)


# ------------------------------------------------------------------------------------------------ names, presets
def test_published_models_and_presets_are_listed_and_resolve():
    assert {"tvrn_sgr_published", "tvrn_saf_published", "tvrn_sgr_published_bert"} <= set(list_models())
    model = create_model("tvrn_sgr_published", **PUB)
    c = model.config
    assert (c.spatial_score, c.spatial_adjacency, c.global_gates, c.shared_attention, c.refine_against,
            c.image_pool_norm) == ("published", "multiply", False, True, "pair", "batch")
    designed = asdict(create_model("tvrn_sgr", **TINY).config)
    assert (designed["spatial_score"], designed["spatial_adjacency"], designed["shared_attention"],
            designed["refine_against"]) == ("cosine", "mask", False, "pair")  # the default stays the design
    names = [p for p in list_presets() if "published" in p]
    assert sorted(names) == sorted(f"tvrn_{r}_published_{d}_{t}" for r in ("sgr", "saf") for d in ("f30k", "coco")
                                   for t in ("gru", "bert"))
    for name in names:
        cfg = resolve_config(name)
        t = cfg["train"]
        assert (t["batch_size"], t["lr_milestones"], t["loss_mode"], t["loss_exclude_same_image"], t["grad_clip"],
                t["patience"], t["epochs"]) == (64, [20], "published", False, 2.0, 8, 50), name
        assert cfg["model"]["name"] in list_models()
        if name.endswith("_gru"):
            assert t["lr"] == 2e-4
