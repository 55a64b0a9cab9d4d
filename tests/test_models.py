"""The same checks over every registered model (tiny sizes, seeded, CPU), then TVRN-specific checks."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.models import create_model
from tvrn.models.base import grid_layout
from tvrn.models.layers import Attention, gru_input, gru_scan, l2norm, spatial_mask
from helpers import B, D, L, MODELS, R, S, build, make_images, make_texts, pad_images, pad_texts  # tiny models


@pytest.mark.parametrize("name", MODELS)
def test_shape_finite_grads_deterministic(name):
    model = build(name).train()
    images, texts = make_images(), make_texts(model)
    scores = model(images, texts)
    assert scores.shape == (B, B) and torch.isfinite(scores).all()
    (scores - scores.diag().mean()).pow(2).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images, texts), model(images, texts))


@pytest.mark.parametrize("name", MODELS)
def test_batched_score_equals_pair_loop_and_is_block_independent(name):
    model = build(name)
    images, texts = make_images(4), make_texts(model, 5)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        full = model.score(ei, et)
        loop = torch.tensor([[model.score(ei[i:i + 1], et[c:c + 1]).item() for c in range(5)] for i in range(4)])
        torch.testing.assert_close(full, loop, atol=1e-5, rtol=0)
        # encoding one item at a time gives the same scores (per-item work does not mix items)
        ei1 = type(ei).cat([model.encode_image(images[i:i + 1]) for i in range(4)])
        et1 = type(et).cat([model.encode_text(texts[c:c + 1]) for c in range(5)])
        torch.testing.assert_close(model.score(ei1, et1), full, atol=1e-5, rtol=0)
        # more images / captions in the block, in another order
        pi, pt = torch.tensor([3, 1, 0, 2]), torch.tensor([4, 0, 3, 1, 2])
        more_i = ImageBatch.cat([images[pi], make_images(2, seed=7)])
        more_t = TextBatch.cat([texts[pt], make_texts(model, 3, seed=8, lengths=(2, 7, 4))])
        big = model(more_i, more_t)
        torch.testing.assert_close(big[:4, :5], full[pi][:, pt], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_padding_has_no_effect(name):
    model = build(name)
    images, texts = make_images(), make_texts(model)
    with torch.no_grad():
        ref = model(images, texts)
        torch.testing.assert_close(model(images, pad_texts(texts, 4)), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(pad_images(images, 3), texts), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_through_config(name):
    model = build(name)
    config = json.loads(json.dumps(asdict(model.config)))  # plain JSON data
    torch.manual_seed(123)
    again = create_model(config["name"], **config).eval()
    again.load_state_dict(model.state_dict())
    images, texts = make_images(), make_texts(model)
    with torch.no_grad():
        assert torch.equal(again(images, texts), model(images, texts))


def test_encoded_containers_slice_and_move():
    model = build("tvrn_sgr")
    with torch.no_grad():
        ei, et = model.encode_image(make_images(4)), model.encode_text(make_texts(model, 5))
    assert len(ei) == 4 and len(et) == 5 and len(ei[1:3]) == 2 and len(et[2]) == 1
    assert ei[1:3].ctx_gram.shape[0] == 2 and et[1:4].hidden.shape[0] == 3
    moved = ei.to("cpu", torch.float64)
    assert moved.regions.dtype == torch.float64 and moved.mask.dtype == torch.bool
    cut = et.trim(3)  # views with the word axis cut: not contiguous
    assert not cut.words.is_contiguous()
    whole = cut.contiguous()
    assert whole.words.is_contiguous() and whole.refined.is_contiguous() and torch.equal(whole.words, cut.words)
    assert whole.hidden is et.hidden  # already contiguous: shared, not copied
    with pytest.raises(KeyError, match="no model named"):
        create_model("nope")
    with pytest.raises(TypeError, match="unknown config keys"):
        create_model("tvrn_sgr", embed_dim=3)


# ----------------------------------------------------------------------------------------- TVRN specifics
SWITCHES_OFF = dict(relational_context=False, spatial_context=False, unify=False, refine_text=False,
                    global_gates=False)


@pytest.mark.parametrize("reasoning", ["sgr", "saf"])
def test_tvrn_with_switches_off_is_sgraf(reasoning):
    sgraf = build(f"sgraf_{reasoning}")
    tvrn_full = build(f"tvrn_{reasoning}")
    tvrn_off = build(f"tvrn_{reasoning}", **SWITCHES_OFF)
    images, texts = make_images(), make_texts(sgraf)
    # SGRAF's state dict loads strictly into TVRN with its switches off ...
    tvrn_off.load_state_dict(sgraf.state_dict())
    # ... and is a subset of the full TVRN's, under the same names
    sd = tvrn_full.state_dict()
    assert set(sgraf.state_dict()) < set(sd)
    sgraf.load_state_dict({k: v for k, v in sd.items() if k in sgraf.state_dict()})
    tvrn_full.load_state_dict(sd)
    with torch.no_grad():
        s_sgraf = sgraf(images, texts)
        tvrn_off.load_state_dict(sgraf.state_dict())
        torch.testing.assert_close(tvrn_off(images, texts), s_sgraf, atol=0, rtol=0)
        torch.testing.assert_close(s_sgraf, sgraf_reference(sgraf, images, texts), atol=1e-5, rtol=0)
        assert not torch.allclose(tvrn_full(images, texts), s_sgraf)


def sgraf_reference(model, images, texts):
    """SGRAF's forward written like the official code: one caption at a time, truncated to its length."""
    V = l2norm(model.img_enc.fc(images.features))  # (Ni, R, D)
    T = model.txt_enc(texts.tokens, texts.mask)
    out = torch.zeros(len(images), len(texts))
    for c in range(len(texts)):
        n = int(texts.mask[c].sum())
        cap = T[c, :n]  # (n, D)
        for k in range(len(images)):
            img = V[k]  # (R, D)
            img_glo = model.image_pool(img, torch.ones(img.shape[0], dtype=torch.bool))
            cap_glo = model.text_pool(cap, torch.ones(n, dtype=torch.bool))
            attn = torch.nn.functional.leaky_relu(img @ cap.T, 0.1)  # (R, n)
            attn = l2norm(attn, dim=1)  # across words
            attn = torch.softmax(attn.T * model.config.lambda_softmax, dim=1)  # (n, R)
            ctx = l2norm(attn @ img)  # (n, D)
            sim_loc = l2norm(model.sim_local((ctx - cap) ** 2))  # (n, S)
            sim_glo = l2norm(model.sim_global((img_glo - cap_glo) ** 2))  # (S,)
            emb = torch.cat([sim_glo[None], sim_loc], 0)[None]  # (1, n+1, S)
            if model.config.reasoning == "sgr":
                for st in model.reason.steps:
                    edge = torch.softmax(st["query"](emb) @ st["key"](emb).transpose(1, 2), -1)
                    emb = torch.relu(st["graph"](edge @ emb))
                vec = emb[:, 0]
            else:
                w = torch.sigmoid(model.reason.attn(emb).transpose(1, 2))  # (1, 1, n+1)
                w = w / (w.abs().sum(-1, keepdim=True) + 1e-8)
                vec = l2norm((w @ emb).squeeze(1))
            out[k, c] = torch.sigmoid(model.sim_eval(vec)).squeeze()
    return out


def test_spatial_attention_ignores_non_adjacent_regions():
    torch.manual_seed(0)
    attn = Attention(D, 9.0, cosine=True)
    V = l2norm(torch.randn(1, R, D))
    mask = torch.ones(1, R, dtype=torch.bool)
    adj = torch.zeros(1, R, R, dtype=torch.bool)
    adj[0, 0, 1] = adj[0, 1, 0] = True  # {0, 1} | {2, 3, 4}
    adj[0, 2:, 2:] = True
    m = spatial_mask(adj, mask)
    assert m[0].diagonal().all()
    ref = attn(V, V, m)
    V2 = V.clone()
    V2[0, 4] = l2norm(torch.randn(D))
    out = attn(V2, V2, m)
    torch.testing.assert_close(out[0, :2], ref[0, :2], atol=0, rtol=0)  # regions 0, 1 unchanged
    assert not torch.allclose(out[0, 2:], ref[0, 2:])
    # an isolated region attends only to itself: its spatial context is itself
    iso = attn(V, V, spatial_mask(torch.zeros(1, R, R, dtype=torch.bool), mask))
    torch.testing.assert_close(iso, V, atol=1e-6, rtol=0)


def test_context_binds_a_colour_region_to_the_object_it_overlaps():
    """Hand-made scene where the answer is known (the synthetic benchmark's ambiguity): two cats, alike but for
    their positions (dims 4, 5), and a red colour region (dim 1) overlapping cat A only. The attention's key
    projection sees only the category (both cats give the same key), so without geometry the red region's context
    is half cat A, half cat B; through the IoU adjacency it is cat A's, with nothing of cat B."""
    def scene_context(**switches):
        model = build("tvrn_sgr", embed_size=8, **switches)
        att = model.spatial if switches.get("relational_context") is False else model.relational
        with torch.no_grad():
            att.q.weight.copy_(torch.eye(8)), att.q.bias.zero_()
            att.k.weight.zero_(), att.k.bias.zero_()
            att.k.weight[1, 0] = 1.0  # key: "is a cat" -> the red query's direction
            e = torch.eye(8)
            V = l2norm(torch.stack([e[0] + e[4], e[1], e[0] + e[5]]))[None]  # cat A, red, cat B
            adj = torch.tensor([[[1, 1, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.bool)  # red overlaps cat A
            return model._context(V, torch.ones(1, 3, dtype=torch.bool), adj)[0, 1]  # the red region's (D,)

    spatial = scene_context(relational_context=False)
    relational = scene_context(spatial_context=False)
    assert spatial[4] > 0.5 and spatial[5] == 0  # cat A's position, none of cat B's
    assert relational[4] == pytest.approx(float(relational[5]), abs=1e-6) and relational[5] > 0.3  # ambiguous


def test_spatial_context_uses_the_adjacency_of_its_own_image():
    model = build("tvrn_sgr")
    images, texts = make_images(), make_texts(model)
    with torch.no_grad():
        ref = model(images, texts)
        other = replace(images, adjacency=torch.ones_like(images.adjacency))
        assert not torch.allclose(model(other, texts), ref)
    with pytest.raises(ValueError, match="adjacency"):
        model.encode_image(replace(images, adjacency=None))


def test_module3_gates_matter():
    model = build("tvrn_sgr")
    images, texts = make_images(), make_texts(model)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        ref = model.score(ei, et)
        flat = replace(ei, gate=torch.zeros_like(ei.gate))  # all gates equal: plain SCAN attention
        assert (model.score(flat, et) - ref).abs().max() > 1e-4
        rolled = replace(ei, gate=model.config.lambda_softmax
                         * torch.einsum("nrd,nd->nr", ei.units, ei.glob.roll(1, 0)))  # another g
        assert (model.score(rolled, et) - ref).abs().max() > 1e-4
        off = build("tvrn_sgr", global_gates=False)
        off.load_state_dict(model.state_dict())
        torch.testing.assert_close(off.score(replace(ei, gate=None), et), model.score(flat, et))


def test_gate_lambda_sets_module3_sharpness():
    """gate_lambda 0: every gate equal, module 3 off; gate_lambda = lambda_softmax: the default."""
    model = build("tvrn_sgr")
    images, texts = make_images(), make_texts(model)
    with torch.no_grad():
        ref = model(images, texts)
        for lam, want in [(0.0, "off"), (model.config.lambda_softmax, "default"), (3.0, "other")]:
            other = build("tvrn_sgr", gate_lambda=lam)
            other.load_state_dict(model.state_dict())
            got = other(images, texts)
            if want == "off":
                off = build("tvrn_sgr", global_gates=False)
                off.load_state_dict(model.state_dict())
                torch.testing.assert_close(got, off(images, texts), atol=1e-6, rtol=0)
            elif want == "default":
                assert torch.equal(got, ref)
            else:
                assert (got - ref).abs().max() > 1e-5


def test_refinement_shortcut_equals_plain_gru_over_expanded_words():
    """Module 2 computed the plain way: E = Attn(T_ctx, C), GRU over [T; E] from scratch per pair."""
    model = build("tvrn_sgr")
    images, texts = make_images(2), make_texts(model, 3)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        T_ref, tmask, _ = model._refine(*grid_layout(ei, et), (2, 3))  # (Ni, Nt, 2L, D)
        V = ei.regions
        C = model._context(V, ei.mask, images.adjacency)
        T = et.words
        T_ctx = model.text_context(T, T, et.mask[:, :, None] & et.mask[:, None, :])
        cell = model.refine_gru
        for k in range(2):
            for c in range(3):
                n = int(et.mask[c].sum())
                q, ctx = model.expand.q(T_ctx[c, :n]), model.expand.k(C[k])  # (n, D), (R, D)
                s = torch.nn.functional.leaky_relu(ctx @ q.T, 0.1)  # (R, n)
                a = torch.softmax(9.0 * l2norm(s, dim=1).T, -1)  # (n, R)
                E = l2norm(a @ C[k])  # (n, D)
                h, outs = torch.zeros(1, D), []
                for x in torch.cat([T[c, :n], E]):
                    h = cell(x[None], h)
                    outs.append(h[0])
                ref = l2norm(torch.stack(outs) + torch.cat([T[c, :n], T[c, :n]]))  # (2n, D)
                got = torch.cat([T_ref[k, c, :n], T_ref[k, c, L:L + n]])
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_gru_scan_matches_nn_gru_cell_and_skips_masked_steps():
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(D, D)
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out, h = gru_scan(cell, gru_input(cell, x), mask)
    for b in range(2):
        hb = torch.zeros(1, D)
        for t in range(6):
            if mask[b, t]:
                hb = cell(x[b, t][None], hb)
                torch.testing.assert_close(out[b, t], hb[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(h[b], hb[0], atol=1e-6, rtol=0)


def test_shortlist_embeddings_are_pair_independent_unit_vectors():
    for name in ("tvrn_sgr", "vse"):
        model = build(name)
        with torch.no_grad():
            ei, et = model.encode_image(make_images()), model.encode_text(make_texts(model))
            gi, gt = model.shortlist_embed_image(ei), model.shortlist_embed_text(et)
        assert gi.shape == (B, D) and gt.shape == (B, D)
        torch.testing.assert_close(gi.norm(dim=-1), torch.ones(B))
        torch.testing.assert_close(gt.norm(dim=-1), torch.ones(B))


ABLATIONS = [dict(relational_context=False), dict(spatial_context=False), dict(unify=False), dict(refine_text=False),
             dict(global_gates=False), dict(global_node=False), dict(global_node=False, reasoning="saf"),
             dict(relational_context=False, spatial_context=False)]


@pytest.mark.parametrize("switches", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_tvrn_ablations_run_pad_and_batch_correctly(switches):
    model = build("tvrn_sgr", **switches).train()
    images, texts = make_images(), make_texts(model)
    model(images, texts).pow(2).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if not switches.get("global_node", True):  # t_glo unused: text_pool only makes the shortlist vector
        dead = [n for n in dead if not n.startswith("text_pool.")]
    assert not dead, f"parameters without gradient: {dead}"
    model.eval()
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        full = model.score(ei, et)
        loop = torch.tensor([[model.score(ei[i:i + 1], et[c:c + 1]).item() for c in range(B)] for i in range(B)])
        torch.testing.assert_close(full, loop, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(pad_images(images, 2), pad_texts(texts, 3)), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- fast inference path
@pytest.mark.parametrize("name", MODELS)
def test_fast_score_equals_plain_score(name):
    """Inference (eval, no grad) groups captions by length and uses exact shortcuts; the plain path is the
    masked computation written like the equations. Mixed lengths and padded regions exercise every branch."""
    model = build(name)
    if not hasattr(model, "_score_plain"):
        pytest.skip("one path only")
    images = pad_images(make_images(4), 2)
    texts = pad_texts(make_texts(model, 6, lengths=(7, 5, 3, 5, 2, 7)), 2)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        torch.testing.assert_close(model.score(ei, et), model._score_plain(ei, et), atol=1e-5, rtol=0)


@pytest.mark.parametrize("switches", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_fast_score_equals_plain_score_for_ablations(switches):
    model = build("tvrn_sgr", **switches)
    images, texts = pad_images(make_images(3), 1), make_texts(model, 4, lengths=(7, 2, 5, 2))
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        torch.testing.assert_close(model.score(ei, et), model._score_plain(ei, et), atol=1e-5, rtol=0)


def test_gru_scan_dense_equals_masked_scan_with_per_caption_first_step():
    from tvrn.models.layers import gru_scan_dense

    torch.manual_seed(0)
    cell = torch.nn.GRUCell(D, D)
    x, h0 = torch.randn(4, 5, D), torch.randn(2, D)  # 4 pairs = 2 images x 2 captions, per-caption h0
    gi = gru_input(cell, x)
    ref, _ = gru_scan(cell, gi, torch.ones(4, 5, dtype=torch.bool), h0.repeat(2, 1))
    gh0 = torch.nn.functional.linear(h0, cell.weight_hh, cell.bias_hh).repeat(2, 1)  # (4, 3D)
    with torch.no_grad():
        got = gru_scan_dense(cell, gi.clone(), h0.repeat(2, 1), torch.empty(4, 5, D), gh0)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(gru_scan_dense(cell, gi.clone(), h0.repeat(2, 1), torch.empty(4, 5, D)), ref,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("read_global", [True, False])
def test_graph_reasoning_dense_shortcuts_equal_plain(read_global):
    from tvrn.models.layers import GraphReasoning

    torch.manual_seed(0)
    sgr = GraphReasoning(S, 3)
    for m in sgr.modules():  # non-zero biases, so the bias term of the edge shortcut is exercised
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias)
    nodes = torch.randn(6, 9, S)
    with torch.no_grad():
        ref = sgr(nodes, torch.ones(6, 9, dtype=torch.bool), read_global)
        torch.testing.assert_close(sgr.forward_dense(nodes, read_global), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_glob", [True, False])
def test_attention_filtration_parts_equal_plain_on_normalised_nodes(with_glob):
    """SAF over [glob; l2(M1); l2(M2)] with the l2 norms folded in equals the plain SAF on the formed nodes."""
    from tvrn.models.layers import AttentionFiltration

    torch.manual_seed(1)
    saf = AttentionFiltration(S)
    torch.nn.init.normal_(saf.attn.bias)
    glob = l2norm(torch.randn(6, S)) if with_glob else None
    parts = [torch.randn(6, 4, S) * 3, torch.randn(6, 5, S)]  # raw similarities, not unit length
    nodes = torch.cat(([glob[:, None]] if with_glob else []) + [l2norm(m) for m in parts], 1)
    with torch.no_grad():
        ref = saf(nodes, torch.ones(nodes.shape[:2], dtype=torch.bool))
        torch.testing.assert_close(saf.forward_parts(glob, parts), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_saf", "scan_t2i"])
def test_units_gram_is_inference_only_per_image_work(name):
    """Encodings made without gradients carry U U^T (per-image work the fast path reads); training encodings
    do not pay for it, and the fast path computes it itself when it is missing, with the same scores."""
    model = build(name)
    images, texts = make_images(4), make_texts(model, 5)
    assert model.encode_image(images).units_gram is None  # grad enabled: a training forward
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        U = ei.units if ei.units is not None else ei.regions
        torch.testing.assert_close(ei.units_gram, U @ U.transpose(1, 2))
        torch.testing.assert_close(model.score(replace(ei, units_gram=None), et), model.score(ei, et),
                                   atol=1e-6, rtol=0)


def test_pair_bytes_every_model():
    for name in MODELS:
        model = build(name)
        with torch.no_grad():
            ei, et = model.encode_image(make_images(2)), model.encode_text(make_texts(model, 2))
        assert model.pair_bytes(ei[:1], et[:1]) > 0


@pytest.mark.parametrize("lam", [4.0, 9.0, 20.0])
@pytest.mark.parametrize("masked", ["none", "context", "query", "both"])
def test_scan_cross_attention_equals_attended_vectors_loop(lam, masked):
    """The unnormalised-softmax, Gram-matrix kernel against SCAN's attended vectors, one pair at a time."""
    from tvrn.models.layers import attention_weights
    from tvrn.models.scan import scan_cross_attention

    g = torch.Generator().manual_seed(int(lam) + len(masked))
    C, Q = l2norm(torch.randn(3, 6, D, generator=g)), l2norm(torch.randn(4, 5, D, generator=g))
    cmask = torch.rand(3, 6, generator=g) > 0.3 if masked in ("context", "both") else None
    qmask = torch.rand(4, 5, generator=g) > 0.3 if masked in ("query", "both") else None
    if cmask is not None:
        cmask[:, 0] = True
        C = C * cmask[..., None]  # padded rows are zero, as encoders return them
    if qmask is not None:
        qmask[:, 0] = True
        Q = Q * qmask[..., None]
    got = scan_cross_attention(C, cmask, Q, qmask, lam)  # (3, 4, 5)
    for b1 in range(3):
        for b2 in range(4):
            cm = torch.ones(6, dtype=torch.bool) if cmask is None else cmask[b1]
            qm = torch.ones(5, dtype=torch.bool) if qmask is None else qmask[b2]
            a = attention_weights(Q[b2] @ C[b1].t(), qm[:, None] & cm[None], lam)  # (Lq, Lc)
            want = (l2norm(a @ C[b1]) * Q[b2]).sum(-1)  # (Lq,)
            torch.testing.assert_close(got[b1, b2][qm], want[qm], atol=1e-6, rtol=0)


def test_squared_difference_in_place_and_broadcast():
    """One-pass (a - b)^2 of the fast paths: into a new tensor with broadcasting, and in place into `a`, equal to
    the plain expression; an expanded operand is read, not written."""
    from tvrn.models.layers import squared_difference

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    out = torch.empty(3, 4, 5)
    assert squared_difference(a, b, out=out) is out
    torch.testing.assert_close(out, (a - b) ** 2, atol=0, rtol=0)
    y, x = torch.randn(2, 6, 5, generator=g), torch.randn(1, 6, 5, generator=g)
    want, x_before = (y - x) ** 2, x.clone()
    squared_difference(y, x, out=y)
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    assert torch.equal(x, x_before)
