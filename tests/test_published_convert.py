"""The TVRN authors' checkpoint and evaluation: `tvrn convert --from tvrn` and `tvrn eval --published-protocol`
against the independent float64 transcription of their computation (tests/official_tvrn.py), on checkpoints
built there with their tensor names and shapes (docs/published-tvrn.md I). float64 within 1e-10, float32 within
1e-6."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import official_tvrn as ref
from tvrn.cli import main
from tvrn.convert import ConvertError, convert_checkpoint
from tvrn.data import load_split
from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.models import create_model
from tvrn.pipeline import published_protocol_scores
from tvrn.scoring import encode_images, encode_texts, score_all
from helpers import iou_adjacency, pad_token_lists
from published_checkpoint import D, DV, R, V, WORDS, checkpoint, vocab  # the authors' checkpoint, tiny


def inputs(ni=6, nt=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(ni, R, DV, generator=g, dtype=torch.float64)
    xy = torch.rand(ni, R, 2, generator=g, dtype=torch.float64) * 60
    boxes = torch.cat([xy, xy + torch.rand(ni, R, 2, generator=g, dtype=torch.float64) * 60 + 20], -1)
    caps = [torch.randint(4, V, (int(n),), generator=g) for n in torch.randint(2, 9, (nt,), generator=g)]
    return feats, iou_adjacency(boxes), caps


def tvrn_encode(model, feats, adjacency, caps, dtype):
    tokens, mask = pad_token_lists(caps)
    with torch.no_grad():
        ei = model.encode_image(ImageBatch(features=feats.to(dtype), mask=torch.ones(feats.shape[:2], dtype=torch.bool),
                                           adjacency=adjacency))
        et = model.encode_text(TextBatch(tokens=tokens, mask=mask))
    return ei, et


def converted(module="SGR", seed=0, dtype=torch.float64, **config):
    ckpt = checkpoint(module, seed)
    out = convert_checkpoint("tvrn", ckpt, "authors.pth.tar", vocab=vocab())
    out["config"]["model"].update(config)
    model = create_model(out["config"]["model_name"], **out["config"]["model"]).to(dtype)
    model.load_state_dict(out["model"])  # float64 weights kept by the converter, loaded without rounding
    return ckpt, out, model.eval()


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_converted_checkpoint_computes_their_model_per_pair(module):
    ckpt, out, model = converted(module)
    assert out["config"]["model_name"] == f"tvrn_{module.lower()}_published"
    dropped = " ".join(out["converted_from"]["dropped"])
    for name in ("scan_attention.fcv.weight", "sim.fcv.weight", "sim_trancon_w.weight", "embedding_common.0.bias"):
        assert name in dropped
    cfg = model.config
    assert (cfg.image_pool_tokens, cfg.shared_attention, cfg.spatial_score, cfg.spatial_adjacency, cfg.global_gates) \
        == (2 * R, True, "published", "multiply", False)
    feats, adj, caps = inputs()
    want = ref.official_scores(ckpt, feats, adj, caps, refine="pair")  # (Ni, Nt) float64
    ei, et = tvrn_encode(model, feats, adj, caps, torch.float64)
    with torch.no_grad():
        got = model.score(ei, et)  # fast path
        plain = model._score_plain(ei, et)
        blocked = score_all(model, ei, et, memory_budget_mb=0.01, out_dtype=torch.float64)
    for x in (got, plain, blocked):
        torch.testing.assert_close(x, want, rtol=0, atol=1e-10)
    # float32 weights and inputs
    model32 = model.float()
    ei, et = tvrn_encode(model32, feats, adj, caps, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model32.score(ei, et).double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_first_image_refinement_equals_their_shards(module):
    ckpt, _, model = converted(module, seed=1, refine_against="first_image", refine_group=3)
    feats, adj, caps = inputs(ni=8, nt=7, seed=1)
    want = ref.official_scores(ckpt, feats, adj, caps, refine="first", shard=3)
    ei, et = tvrn_encode(model, feats, adj, caps, torch.float64)
    with torch.no_grad():
        got = score_all(model, ei, et, block_texts=2, out_dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert (want - ref.official_scores(ckpt, feats, adj, caps, refine="pair")).abs().max() > 1e-4


def test_every_unconsumed_or_missing_tensor_is_refused_by_name():
    ckpt = checkpoint()
    ckpt["model"][2]["sim_extra_w.weight"] = torch.zeros(3)
    with pytest.raises(ConvertError, match="sim.sim_extra_w.weight"):
        convert_checkpoint("tvrn", ckpt, "authors.pth.tar", vocab=vocab())
    ckpt = checkpoint()
    del ckpt["model"][2]["img_rnn.weight_hh_l0"]
    with pytest.raises((ConvertError, KeyError), match="img_rnn.weight_hh_l0"):
        convert_checkpoint("tvrn", ckpt, "authors.pth.tar", vocab=vocab())
    ckpt = checkpoint()
    ckpt["model"][2]["scan_attention.fcq.weight"] = torch.zeros(D + 1, D, dtype=torch.float64)
    with pytest.raises(ConvertError, match="shapes that differ"):
        convert_checkpoint("tvrn", ckpt, "authors.pth.tar", vocab=vocab())
    with pytest.raises(ConvertError, match="3 state dicts"):
        convert_checkpoint("tvrn", dict(checkpoint(), model=checkpoint()["model"][:2]), "a.pth", vocab=vocab())


def _write_split(root, n_images, seed=0):
    """A precomp split of n_images x 5 captions in the authors' sizes (R regions of DV features, boxes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "test_ims.npy", rng.standard_normal((n_images, R, DV)).astype(np.float32))
    xy = rng.uniform(0, 60, (n_images, R, 2))
    np.save(root / "test_ims_bbx.npy", np.concatenate([xy, xy + rng.uniform(20, 80, (n_images, R, 2))], -1)
            .astype(np.float32))
    caps = [" ".join(rng.choice(WORDS, int(rng.integers(2, 8)))) for _ in range(5 * n_images)]
    (root / "test_caps.txt").write_text("\n".join(caps) + "\n")
    vocab().save(root / "vocab.json")


def test_published_protocol_equals_their_evaluation(tmp_path):
    """F + E on a split: shards of `shard` images, first-image refinement, the last batch's adjacency."""
    _write_split(tmp_path / "data", 20)
    split = load_split(tmp_path / "data", "test")
    ckpt, out, model = converted("SGR", seed=2)
    model = model.float()
    tok = vocab()
    caps = [torch.tensor(tok.encode(c)) for c in split.captions]
    feats = torch.from_numpy(split.image_features(np.arange(20))).double()
    adj = iou_adjacency(torch.from_numpy(split.boxes(np.arange(20))).double())
    want = ref.published_eval_scores(ckpt, feats, adj, caps, shard=10)
    got = published_protocol_scores(model, split, tok, {"eval_batch_size": 7}, shard=10)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # the per-pair evaluation of the same weights is another matrix
    per_pair = ref.official_scores(ckpt, feats, adj, caps, refine="pair")
    assert (want - per_pair).abs().max() > 1e-3


def test_cli_convert_and_eval_published_protocol(tmp_path, capsys):
    """`tvrn convert --from tvrn` then `tvrn eval --published-protocol` on 100 images x 500 captions."""
    _write_split(tmp_path / "data", 100, seed=3)
    ckpt = checkpoint(seed=3)
    torch.save(ckpt, tmp_path / "model_best.pth.tar")
    vocab().save(tmp_path / "f30k_precomp_vocab.json")
    assert main(["convert", "--from", "tvrn", str(tmp_path / "model_best.pth.tar"), "--vocab",
                 str(tmp_path / "f30k_precomp_vocab.json"), "--out", str(tmp_path / "tvrn.pt")]) == 0
    assert "tvrn_sgr_published" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "tvrn.pt"), "--data", str(tmp_path / "data"), "--split", "test",
                 "--published-protocol", "--no-progress", "--out", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "as the TVRN authors' evaluation script computes it" in text
    result = json.loads((tmp_path / "m.json").read_text())
    # the CLI's numbers are the library's (whose matrix equals the transcription's: the test above)
    from tvrn.evaluation import evaluate
    from tvrn.checkpoint import load_trained

    split = load_split(tmp_path / "data", "test")
    model, tok, _ = load_trained(tmp_path / "tvrn.pt")
    c2i = torch.as_tensor(split.caption_to_image)
    want = evaluate(published_protocol_scores(model, split, tok, {}), c2i)
    for k, v in want.items():
        assert result["published_protocol"][k] == pytest.approx(v, abs=0.006), k  # the JSON rounds to 2 decimals
    assert result["rsum"] != result["published_protocol"]["rsum"]
    # a split whose sizes are not multiples of 100 is refused with the counts
    _write_split(tmp_path / "small", 12)
    assert main(["eval", str(tmp_path / "tvrn.pt"), "--data", str(tmp_path / "small"), "--split", "test",
                 "--published-protocol", "--no-progress"]) == 2
    assert "multiples of 100" in capsys.readouterr().err
