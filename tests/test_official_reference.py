"""Self-checks of the float64 reference of the authors' TVRN scoring (tests/official_tvrn.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import official_tvrn as ref  # noqa: E402

R, DV, VOCAB = 4, 10, 20


def _data(n_images, n_captions, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_images, R, DV, generator=g, dtype=torch.float64)
    adj = torch.rand(n_images, R, R, generator=g) < 0.4
    adj = adj | adj.transpose(1, 2) | torch.eye(R, dtype=torch.bool)
    lengths = torch.randint(1, 6, (n_captions,), generator=g).tolist()
    caps = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    return feats, adj, caps


@pytest.fixture(scope="module", params=["SGR", "SAF"])
def ckpt(request):
    return ref.make_official_checkpoint(module=request.param, regions=R, img_dim=DV, vocab_size=VOCAB)


def test_checkpoint_layout():
    ck = ref.make_official_checkpoint("SGR")
    img, txt, sim = ck["model"]
    assert set(img) == {"fc.weight", "fc.bias"}
    assert txt["cap_rnn.weight_ih_l0_reverse"].shape == (36, 7) and txt["embed.weight"].shape == (20, 7)
    assert sim["v_global_w.embedding_local.1.running_var"].shape == (8,)
    assert sim["v_global_w.embedding_global.1.num_batches_tracked"].dtype == torch.long
    assert sim["SGR_module.2.graph_key_w.bias"].shape == (6,) and "SGR_module.3.graph_key_w.bias" not in sim
    for name in ("scan_attention.fcv.weight", "fcv.bias", "sim_trancon_w.weight", "v_global_w.embedding_common.0.bias"):
        assert name in sim
    assert all(v.dtype == torch.float64 for sd in ck["model"] for v in sd.values() if v.is_floating_point())
    assert all(bool((v > 0).all()) for k, v in sim.items() if k.endswith("running_var"))
    saf = ref.make_official_checkpoint("SAF", dtype=torch.float32)["model"][2]
    assert saf["SAF_module.bn.weight"].shape == (1,) and saf["fcq.weight"].dtype == torch.float32
    assert not any(k.startswith("SGR_module") for k in saf)
    assert ck["opt"].module_name == "SGR" and ck["opt"].sgr_step == 3 and ck["opt"].bi_gru


def test_adjacency_substitution_by_hand():
    adj = torch.arange(20).view(20, 1, 1).expand(20, R, R)  # adjacency of image i filled with i
    out = ref.official_adjacency_substitution(adj, n_captions=100, shard=10)
    expected = ([18] * 5 + [19] * 5) * 2  # image k of each shard: (90 + k) // 5
    assert out[:, 0, 0].tolist() == expected
    with pytest.raises(ValueError):
        ref.official_adjacency_substitution(adj, n_captions=95, shard=10)
    with pytest.raises(ValueError):
        ref.official_adjacency_substitution(adj[:15], n_captions=75, shard=10)


def test_spatial_non_adjacent_regions_keep_weight():
    sim = ref.make_official_checkpoint()["model"][2]
    V = ref.l2(torch.randn(R, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    A = torch.eye(R, dtype=torch.bool)  # no region adjacent to another
    w = ref.spatial_weights(V, A, sim)  # (query j, source i)
    assert torch.allclose(w.sum(1), torch.ones(R, dtype=torch.float64))
    # B: source i != j has score 0 -> weight exp(0) / Z, not 0; the only nonzero score s[j, j] becomes +-1 after
    # the l2 over queries (sign of rho(r[j, j])), so Z = exp(+-9) + R - 1
    q, k = ref.linear(V, sim, "fcq"), ref.linear(V, sim, "fck")
    sign = torch.sign((k * q).sum(1))  # sign of r[j, j]
    Z = torch.exp(9 * sign) + R - 1
    off = ~torch.eye(R, dtype=torch.bool)
    assert bool((w[off] > 0).all())
    assert torch.allclose(w, torch.where(off, 1 / Z[:, None], (torch.exp(9 * sign) / Z)[:, None]), rtol=1e-12)
    # A: with every region adjacent, the weights follow r[i, j] = <k_i, q_j> / (|q_j| |k_j|) (key norm at j)
    r = (k @ q.T) / (q.norm(dim=1)[None, :] * k.norm(dim=1)[None, :])  # r[i, j]
    full = torch.ones(R, R, dtype=torch.bool)
    s = ref.l2(ref.rho(r), dim=1)
    assert torch.allclose(ref.spatial_weights(V, full, sim), torch.softmax(9 * s.T, dim=1), rtol=1e-12)
    cos = (k @ q.T) / (q.norm(dim=1)[None, :] * k.norm(dim=1)[:, None])  # the designed cosine differs
    assert not torch.allclose(ref.spatial_weights(V, full, sim), torch.softmax(9 * ref.l2(ref.rho(cos), 1).T, 1))


def test_first_image_row_equals_pair(ckpt):
    feats, adj, caps = _data(6, 5)
    pair = ref.official_scores(ckpt, feats, adj, caps, refine="pair")
    first = ref.official_scores(ckpt, feats, adj, caps, refine="first", shard=3)
    assert pair.shape == first.shape == (6, 5) and pair.dtype == torch.float64
    assert bool(((pair > 0) & (pair < 1)).all())
    assert torch.allclose(first[[0, 3]], pair[[0, 3]], rtol=0, atol=1e-12)  # first images: refined against itself
    assert (first[[1, 2, 4, 5]] - pair[[1, 2, 4, 5]]).abs().max() > 1e-6  # the others: against another image
    one = ref.official_scores(ckpt, feats[:1], adj[:1], caps, refine="first")
    assert torch.allclose(one, pair[:1], rtol=0, atol=1e-12)


def test_first_refinement_permutation(ckpt):
    feats, adj, caps = _data(6, 4, seed=2)
    base = ref.official_scores(ckpt, feats, adj, caps, refine="first", shard=3)
    perm = torch.tensor([0, 2, 1, 3, 5, 4])  # permute within each shard, keeping its first image
    out = ref.official_scores(ckpt, feats[perm], adj[perm], caps, refine="first", shard=3)
    assert torch.allclose(out, base[perm], rtol=0, atol=1e-12)
    swap = torch.tensor([1, 0, 2, 3, 4, 5])  # a new first image changes the other rows of the shard
    out = ref.official_scores(ckpt, feats[swap], adj[swap], caps, refine="first", shard=3)
    assert (out[2] - base[2]).abs().max() > 1e-6
    assert torch.allclose(out[3:], base[3:], rtol=0, atol=1e-12)  # the other shard does not move


def test_published_eval_uses_substituted_adjacency():
    ck = ref.make_official_checkpoint(regions=R, img_dim=DV, vocab_size=VOCAB)
    feats, adj, caps = _data(4, 8, seed=4)
    adj2 = ref.official_adjacency_substitution(adj, 8, 2)  # image k of each shard: (6 + k) // 2 -> 3, 3
    assert torch.equal(adj2, adj[[3, 3, 3, 3]])
    out = ref.published_eval_scores(ck, feats, adj, caps, shard=2)
    assert torch.allclose(out, ref.official_scores(ck, feats, adj2, caps, refine="first", shard=2), rtol=0, atol=0)


@pytest.mark.parametrize("name,used", [("scan_attention.fcv.weight", False), ("fcv.bias", False),
                                       ("sim_trancon_w.weight", False), ("scan_attention.fcq.weight", True),
                                       ("fck.weight", True), ("img_rnn.bias_hh_l0", True)])
def test_unused_tensors(name, used):
    ck = ref.make_official_checkpoint(regions=R, img_dim=DV, vocab_size=VOCAB)
    feats, adj, caps = _data(2, 3, seed=5)
    base = ref.official_scores(ck, feats, adj, caps)
    sim = dict(ck["model"][2])
    sim[name] = sim[name] + 0.5 * torch.randn(sim[name].shape, generator=torch.Generator().manual_seed(6),
                                              dtype=torch.float64)
    out = ref.official_scores(dict(ck, model=[ck["model"][0], ck["model"][1], sim]), feats, adj, caps)
    diff = (out - base).abs().max().item()
    assert (diff > 1e-6) if used else (diff == 0.0)


def test_caption_words_only_and_reverse_direction():
    """The bi-GRU sees the real words only: the reverse direction of word 1 depends on word 2."""
    _, txt, sim = ref._unpack(ref.make_official_checkpoint(vocab_size=VOCAB))[:3]
    a = ref.encode_caption(torch.tensor([3, 4, 5]), txt, sim)["T"]
    b = ref.encode_caption(torch.tensor([3, 4, 6]), txt, sim)["T"]
    assert (a[0] - b[0]).abs().max() > 1e-6
    assert torch.allclose(a.norm(dim=1), torch.ones(3, dtype=torch.float64))
