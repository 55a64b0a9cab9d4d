import math

import pytest
import torch

from tvrn.metrics import METRIC_NAMES, i2t_ranks, retrieval_metrics, t2i_ranks


def loop_ranks(scores, c2i):
    """Plain Python reference: rank = 1 + #negatives scoring >= the ground truth."""
    ni, nt = scores.shape
    s = scores.tolist()
    t2i = []
    for c in range(nt):
        gt = s[c2i[c]][c]
        t2i.append(1 + sum(1 for i in range(ni) if i != c2i[c] and s[i][c] >= gt))
    i2t = []
    for i in range(ni):
        best = max(s[i][c] for c in range(nt) if c2i[c] == i)
        i2t.append(1 + sum(1 for c in range(nt) if c2i[c] != i and s[i][c] >= best))
    return i2t, t2i


def loop_metrics(i2t, t2i):
    import numpy as np

    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}/R@{k}"] = 100.0 * sum(x <= k for x in r) / len(r)
        out[f"{name}/medr"] = math.floor(np.median(r))
        out[f"{name}/meanr"] = sum(r) / len(r)
    out["rsum"] = sum(out[f"{n}/R@{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def test_hand_computed_ranks():
    # 3 images x 4 captions; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    s = torch.tensor(
        [
            [0.1, 0.5, 0.9, 0.2],  # image 0: best own 0.5; negatives >= 0.5: 0.9 -> rank 2
            [0.3, 0.3, 0.3, 0.4],  # image 1: own 0.3; negatives >= 0.3: 0.3, 0.3, 0.4 -> rank 4 (ties count)
            [0.0, 0.0, 0.0, 0.7],  # image 2: own 0.7 -> rank 1
        ]
    )
    c2i = torch.tensor([0, 0, 1, 2])
    assert i2t_ranks(s, c2i).tolist() == [2, 4, 1]
    # caption 0 (img 0, 0.1): 0.3 >= -> 2; caption 1 (0.5): rank 1; caption 2 (img 1, 0.3): 0.9 -> 2;
    # caption 3 (img 2, 0.7): nothing >= -> 1
    assert t2i_ranks(s, c2i).tolist() == [2, 1, 2, 1]
    m = retrieval_metrics(s, c2i)
    assert list(m) == list(METRIC_NAMES)
    assert m["i2t/R@1"] == pytest.approx(100 / 3)
    assert m["t2i/R@1"] == pytest.approx(50.0)
    assert m["t2i/medr"] == 1.0  # median of [1, 1, 2, 2] = 1.5 -> floor 1
    assert m["i2t/meanr"] == pytest.approx(7 / 3)
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 50 + 100 + 100)


def test_ties_are_pessimistic_and_order_independent():
    s = torch.zeros(4, 8)  # every score tied
    c2i = torch.arange(8) // 2
    assert t2i_ranks(s, c2i).tolist() == [4] * 8  # 3 tied negative images count against
    assert i2t_ranks(s, c2i).tolist() == [7] * 4  # 6 tied negative captions; its own other caption does not
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert t2i_ranks(s[:, perm], c2i[perm]).tolist() == [4] * 8


@pytest.mark.parametrize("chunk", [1, 7, 10_000, 2**24])
def test_five_captions_against_loop(chunk):
    g = torch.Generator().manual_seed(0)
    ni = 13
    c2i = torch.arange(ni * 5) // 5
    s = torch.randn(ni, ni * 5, generator=g)
    s[c2i, torch.arange(ni * 5)] += 1.5  # make retrieval non-trivial
    s = (s * 4).round() / 4  # plenty of ties
    ref_i2t, ref_t2i = loop_ranks(s, c2i.tolist())
    assert i2t_ranks(s, c2i, chunk_elems=chunk).tolist() == ref_i2t
    assert t2i_ranks(s, c2i, chunk_elems=chunk).tolist() == ref_t2i
    got = retrieval_metrics(s, c2i)
    for k, v in loop_metrics(ref_i2t, ref_t2i).items():
        assert got[k] == pytest.approx(v), k


def test_unordered_captions_against_loop():
    g = torch.Generator().manual_seed(1)
    c2i = torch.randint(0, 6, (30,), generator=g)
    c2i[:6] = torch.arange(6)  # every image has a caption
    s = torch.randn(6, 30, generator=g)
    ref_i2t, ref_t2i = loop_ranks(s, c2i.tolist())
    assert i2t_ranks(s, c2i).tolist() == ref_i2t
    assert t2i_ranks(s, c2i).tolist() == ref_t2i


def test_errors():
    with pytest.raises(ValueError, match="without any caption"):
        i2t_ranks(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        t2i_ranks(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        t2i_ranks(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))


def test_large_matrix_is_fine():
    # a COCO-5K-shaped problem at 1/5 scale per side; chunking keeps the temporaries small
    ni = 1000
    c2i = torch.arange(ni * 5) // 5
    s = torch.randn(ni, ni * 5, generator=torch.Generator().manual_seed(0))
    m = retrieval_metrics(s, c2i)
    assert 0 <= m["rsum"] <= 600


# ---- evaluation protocols ---------------------------------------------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402

from tvrn.evaluation import ensemble, evaluate, evaluate_protocol, load_scores, save_scores  # noqa: E402
from tvrn.fileio import write_json  # noqa: E402


def _five_fold_problem(fold_images=12, folds=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ni = fold_images * folds
    c2i = torch.arange(ni * 5) // 5
    s = torch.randn(ni, ni * 5, generator=g)
    s[c2i, torch.arange(ni * 5)] += torch.linspace(0, 3, ni)[c2i]  # folds of different difficulty
    return s, c2i


def test_coco_1k_equals_folds_by_hand():
    s, c2i = _five_fold_problem()
    res = evaluate_protocol(s, c2i, "coco_1k")
    assert res["protocol"] == "coco_1k" and len(res["folds"]) == 5
    by_hand = []
    for k in range(5):
        sub = s[k * 12 : (k + 1) * 12, k * 60 : (k + 1) * 60]  # 12 images x their 60 captions
        by_hand.append(evaluate(sub, c2i[k * 60 : (k + 1) * 60] - k * 12))
        assert res["folds"][k] == pytest.approx(by_hand[k])
    for name in METRIC_NAMES:
        assert res[name] == pytest.approx(sum(f[name] for f in by_hand) / 5)
    assert res["rsum"] != pytest.approx(by_hand[0]["rsum"])  # not just the first fold
    # all-pairs protocols see the whole matrix
    for p in ("coco_5k", "all", "f30k_1k"):
        assert evaluate_protocol(s, c2i, p)["rsum"] == pytest.approx(evaluate(s, c2i)["rsum"])
    with pytest.raises(ValueError):
        evaluate_protocol(s[:7], c2i, "coco_1k")
    with pytest.raises(ValueError):
        evaluate_protocol(s, c2i, "nope")


def test_ensemble_and_saved_scores(tmp_path):
    s1, c2i = _five_fold_problem(seed=1)
    s2, _ = _five_fold_problem(seed=2)
    assert torch.allclose(ensemble([s1, s2]), (s1 + s2) / 2)
    with pytest.raises(ValueError):
        ensemble([s1, s2[:, :10]])
    path = tmp_path / "scores.npy"
    save_scores(path, s1)
    assert torch.equal(load_scores(path, expected_shape=tuple(s1.shape)), s1)
    with pytest.raises(ValueError, match="scores.npy"):
        load_scores(path, expected_shape=(5, 5))
    np.save(tmp_path / "flat.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="flat.npy"):
        load_scores(tmp_path / "flat.npy")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "out" / "res.json"
    write_json(path, {"rsum": 1.5})
    write_json(path, {"rsum": 2.5})
    assert json.loads(path.read_text()) == {"rsum": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["res.json"]  # no temp files left behind
