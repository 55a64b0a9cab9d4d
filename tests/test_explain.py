"""Explanations (`tvrn.models.explain`): the score is score_all's, the weights are the ones the model used, and the
search layer / CLI show them."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from helpers import B, D, MODELS, build, make_images, make_texts, pad_images
from tvrn.cli import main
from tvrn.models import EncodedImages, EncodedTexts, explain, explain_encoded, explain_pairs
from tvrn.models.layers import attention_weights, l2norm
from tvrn.scoring import encode_images, encode_texts, score_all

LENGTHS = (7, 5, 3, 6)


def _double(images):
    return images.to(dtype=torch.float64)


@pytest.mark.parametrize("name", MODELS)
def test_explained_score_is_score_alls_in_float64(name):
    """Every registered model: the explained pair's score is tvrn.scoring.score_all's (the fast inference path,
    blocks, length groups) for that pair, to 1e-10 in float64; padded regions change nothing."""
    model = build(name).double()
    texts = make_texts(model, 4, lengths=LENGTHS)
    for images in (_double(make_images(4)), _double(pad_images(make_images(4), 2))):
        full = score_all(model, encode_images(model, [images]), encode_texts(model, [texts]), out_dtype=torch.float64)
        ex = explain_pairs(model, images, texts)
        assert ex.score.dtype == torch.float64 and ex.score.shape == (4,)
        torch.testing.assert_close(ex.score, full.diag(), atol=1e-10, rtol=0)
        one = explain(model, images[2], texts[2])  # one pair on its own: the same score, padding removed
        assert abs(one.score - float(full[2, 2])) < 1e-10
        assert one.tokens.tolist() == texts.tokens[2, :LENGTHS[2]].tolist()
        assert one.regions.tolist() == list(range(5))  # the real regions only
        if one.attention is not None:
            assert one.attention.shape == (LENGTHS[2], 5)


@pytest.mark.parametrize("name", ["tvrn_sgr", "scan_t2i", "sgraf_saf"])
def test_recording_changes_nothing(name):
    """score_pairs with a record dict gives bit-identical scores to score_pairs without one."""
    model = build(name)
    images, texts = make_images(4), make_texts(model, 4, lengths=LENGTHS)
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
        for field in ("regions", "units", "glob", "gate", "ctx_keys"):
            a, b = getattr(model.encode_image(images, record={}), field), getattr(ei, field)
            assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(model.score_pairs(ei, et, record={}), model.score_pairs(ei, et))


def test_tvrn_explanation_fields():
    """TVRN with every module: 2L word rows, 2R unit columns folded to (L, R) rows that sum to 1, gates summing to
    1, context weights of the image side and module 2, contributions that with the global node sum to 1."""
    model = build("tvrn_sgr").double()
    images, texts = _double(make_images(4)), make_texts(model, 4, lengths=LENGTHS)
    ex = explain_pairs(model, images, texts).item(1)
    L, R = LENGTHS[1], 5
    assert ex.unit_attention.shape == (2 * L, 2 * R) and ex.attention.shape == (L, R)
    assert ex.unit_word.tolist() == list(range(L)) * 2 and ex.unit_region.tolist() == list(range(R)) * 2
    torch.testing.assert_close(ex.attention.sum(1), torch.ones(L, dtype=torch.float64))
    # the fold: token l's rows l and L + l averaged, region r's units r and R + r summed
    a = ex.unit_attention
    torch.testing.assert_close(ex.attention[3, 2], (a[3, 2] + a[3, 2 + R] + a[L + 3, 2] + a[L + 3, 2 + R]) / 2)
    torch.testing.assert_close(ex.gates.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert set(ex.context) == {"relational", "spatial", "refine"}
    assert ex.context["spatial"].shape == (R, R) and ex.context["refine"].shape == (L, R)
    torch.testing.assert_close(ex.context["relational"].sum(1), torch.ones(R, dtype=torch.float64))
    # the spatial context only weighs overlapping regions (IoU adjacency of the boxes)
    adj = images.adjacency[1] | torch.eye(R, dtype=torch.bool)
    assert float(ex.context["spatial"][~adj].abs().max()) == 0.0
    assert ex.contribution_kind == "sgr_global_edge" and ex.local_nodes.shape == (2 * L, model.config.sim_dim)
    assert abs(float(ex.word_contributions.sum()) + ex.global_contribution - 1) < 1e-9
    assert ex.boxes.shape == (R, 4) and torch.equal(ex.boxes, images.boxes[1].float())
    top = ex.top_regions(0, 2)
    assert [r for r, _ in top] == ex.attention[0].argsort(descending=True)[:2].tolist()
    d = ex.to_dict()
    json.dumps(d)
    assert len(d["attention"]) == L and "unit_attention" not in d


def test_recorded_weights_are_the_ones_the_score_used():
    """SCAN t2i: the per-word cosines recomputed from the recorded attention and the regions are the recorded
    contributions, and their LogSumExp is the score; SGRAF: the recorded attention over the regions gives the
    recorded similarity nodes."""
    model = build("scan_t2i").double()
    images, texts = _double(make_images(4)), make_texts(model, 4, lengths=LENGTHS)
    ex = explain_pairs(model, images, texts)
    with torch.no_grad():
        V, T = model.encode_image(images).regions, model.encode_text(texts).words
    for p in range(4):
        e = ex.item(p)
        cos = (l2norm(e.attention @ V[p]) * T[p, : LENGTHS[p]]).sum(-1)
        torch.testing.assert_close(cos, e.word_contributions)
        lam = model.config.lambda_lse
        assert abs(float(torch.logsumexp(lam * cos, 0) / lam) - e.score) < 1e-10
    model = build("sgraf_sgr").double()
    ex = explain_pairs(model, images, texts).item(0)
    with torch.no_grad():
        ei, et = model.encode_image(images[0]), model.encode_text(texts[0])
        nodes = l2norm(model.sim_local((l2norm(ex.attention @ ei.units[0]) - et.words[0]) ** 2))
    torch.testing.assert_close(nodes, ex.local_nodes)


def _orthonormal_pair(R=5, perm=(3, 0, 4, 1, 2)):
    """Encodings where word l is region perm[l]'s vector exactly: a model attending by content must point there."""
    V = torch.eye(D, dtype=torch.float64)[:R][None]  # (1, R, D) unit, orthogonal
    T = V[:, list(perm)]  # (1, L, D)
    mask_r, mask_w = torch.ones(1, R, dtype=torch.bool), torch.ones(1, len(perm), dtype=torch.bool)
    g = l2norm(V.sum(1))
    return (EncodedImages(regions=V, mask=mask_r, units=V, units_mask=mask_r, glob=g),
            EncodedTexts(words=T, mask=mask_w, glob=g), torch.tensor(perm))


@pytest.mark.parametrize("name", ["scan_t2i", "sgraf_sgr", "sgraf_saf"])
def test_attention_points_where_the_words_are(name):
    """A constructed case with a known answer: each word is one region's vector, so the word-to-region attention
    (clipped l2 across words, softmax lambda=9) peaks on that region."""
    model = build(name).double()
    ei, et, perm = _orthonormal_pair()
    ex = explain_encoded(model, ei, et)
    assert ex.pointed_regions()[0].tolist() == perm.tolist()
    assert float(ex.attention[0].max(1).values.min()) > 0.9


def test_module_3_gates_steer_the_recorded_attention():
    """TVRN's module 3 multiplies the word-to-unit weights by the gates: a large log-gate on one unit moves the
    recorded attention there, and the recorded attention is attention_weights(T_ref U^T, gate) of the encodings."""
    model = build("tvrn_sgr", refine_text=False, unify=False).double()  # T_ref = T, U = V: the weights are checkable
    images, texts = _double(make_images(1)), make_texts(model, 1, lengths=(6,))
    with torch.no_grad():
        ei, et = model.encode_image(images), model.encode_text(texts)
    ex = explain_encoded(model, ei, et)
    want = attention_weights(et.words @ ei.units.transpose(1, 2), torch.ones(1, 6, 5, dtype=torch.bool),
                             model.config.lambda_softmax, ei.gate[:, None, :])
    torch.testing.assert_close(ex.attention, want)
    gate = ei.gate.clone()
    gate[0, 3] = 50.0
    steered = explain_encoded(model, replace(ei, gate=gate), et)
    assert steered.pointed_regions()[0].tolist() == [3] * 6
    assert float(steered.gates[0, 3]) > 0.99


def test_scan_i2t_attention_is_region_to_word():
    model = build("scan_i2t").double()
    images, texts = _double(make_images(2)), make_texts(model, 2, lengths=(6, 4))
    ex = explain_pairs(model, images, texts).item(1)
    assert ex.direction == "region_to_word" and ex.attention.shape == (4, 5)
    torch.testing.assert_close(ex.attention.sum(0), torch.ones(5, dtype=torch.float64))  # each region over words
    assert ex.region_contributions.shape == (5,) and ex.word_contributions is None


def test_dual_encoders_explain_the_score_only():
    model = build("vse").double()
    images, texts = _double(make_images(2)), make_texts(model, 2)
    ex = explain_pairs(model, images, texts).item(0)
    assert ex.attention is None and ex.top_regions(0) == [] and ex.gates is None and ex.context == {}
    assert explain_pairs(model, images, texts).pointed_regions() is None


def test_mismatched_pairs_and_train_mode():
    model = build("scan_t2i")
    images, texts = make_images(3), make_texts(model, 3)
    with pytest.raises(ValueError, match="as many images as captions"):
        explain_pairs(model, images, texts[:2])
    with pytest.raises(ValueError, match="one image and one caption"):
        explain(model, images, texts)
    trained = build("tvrn_sgr").train()
    assert not explain_pairs(trained, images, texts).score.requires_grad and trained.training  # mode restored


# ----------------------------------------------------------------------------------------- search layer and CLI
# `setup`: the tiny rendered index, a fixture of conftest.py


def test_index_explain_is_the_search_hit(setup):
    """SearchIndex.explain: the score is the search hit's, the words the query's, the boxes the split's."""
    _, data, _, path, index, _ = setup
    from tvrn.data import load_split
    from tvrn.search import SearchIndex, SearchIndexError

    again = SearchIndex.load(path)  # the folder form (encodings read from disk)
    q = "a small red ball on top of a blue box"
    hits = again.search_text(q, k=3, shortlist=None)
    boxes = torch.as_tensor(load_split(data, "test").boxes([hits[0].index]))[0]
    for h in hits:
        ex = again.explain(q, h.index)
        assert abs(ex.score - h.score) < 1e-6
    ex = again.explain(q, hits[0].index)
    assert ex.words == ["<start>", "a", "small", "red", "ball", "on", "top", "of", "a", "blue", "box", "<end>"]
    assert torch.equal(ex.boxes, boxes) and ex.attention.shape == (12, 8)
    assert set(ex.context) == {"relational", "spatial", "refine"}
    assert again.explain("a zebra", 0).words[2] == "zebra"  # an unknown word shows as itself
    for bad in (-1, 12, True, "3"):
        with pytest.raises(SearchIndexError, match="image index"):
            again.explain(q, bad)
    with pytest.raises(SearchIndexError, match="empty"):
        again.explain("   ", 0)


def test_explain_command(setup, capsys):
    _, _, _, path, index, _ = setup
    q = "a red ball"
    assert main(["explain", str(path), q, "--image", "4", "-k", "2"]) == 0
    out = capsys.readouterr().out
    ex = index.explain(q, 4)
    assert f"score {ex.score:.4f}" in out and "module-3 gates" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[3:3 + len(ex.words)]}
    r, w = ex.top_regions(3, 2)[0]  # "ball": its top region, box and weight on its line
    box = "[" + ", ".join(f"{float(v):.0f}" for v in ex.boxes[r]) + "]"
    assert f"{r} {box} {w:.3f}" in lines["ball"]
    assert main(["explain", "--image", "4", str(path), q, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["image"] == 4 and got["words"] == ex.words and len(got["attention"]) == len(ex.words)
    assert abs(got["score"] - ex.score) < 1e-6
    assert main(["explain", str(path), q, "--image", "12"]) == 2
    assert "the index has images 0..11" in capsys.readouterr().err
