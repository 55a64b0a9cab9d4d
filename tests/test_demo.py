"""The demo's test evaluation: folds scored without the whole matrix, twin accuracy from the twin pairs only, and
a finished run re-evaluated (not retrained) when the test changes. The end-to-end runs are in tests/test_cli.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tvrn.data import Vocabulary, load_split
from tvrn.data.synth import SynthConfig, write_dataset
from tvrn.demo import DemoEntry, fold_count, read_twins, run_demo, twin_accuracy, twin_accuracy_encoded
from tvrn.evaluation import encode_split, evaluate_folds, evaluate_protocol, score_folds, score_split
from tvrn.checkpoint import build_tokenizer
from tvrn.pipeline import build_model, resolve_config

DATA = {"eval_batch_size": 7, "block_images": 3, "block_texts": 11}  # blocks that cut across folds and twins


@pytest.fixture(scope="module")
def twinned(tmp_path_factory):
    """A small benchmark whose test split (20 images, 100 captions) holds twins, and an untrained tvrn_sgr on it
    -> (model, tokenizer, split, twin_of)."""
    root = tmp_path_factory.mktemp("twins") / "synth"
    write_dataset(root, SynthConfig(seed=5, train_images=4, dev_images=2, test_images=20, regions=8, feature_dim=32,
                                    render_images=False, twin_fraction=0.5))
    split = load_split(root, "test")
    vocab = Vocabulary.load(root / "vocab.json")
    cfg = resolve_config("demo_synth", [f"data.root={root}", "model.name=tvrn_sgr", "model.embed_size=16",
                                        "model.sim_dim=8", "model.word_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg, split.feature_size, vocab).eval()
    twins = read_twins(root, "test", split.num_images)
    assert (twins >= 0).sum() >= 6
    return model, build_tokenizer(model.config, vocab), split, twins


@pytest.fixture(scope="module")
def full(twinned):
    model, tok, split, _ = twinned
    return score_split(model, split, tok, DATA)  # (20, 100), every pair


@pytest.mark.parametrize("n_folds", [1, 4, 5])
def test_folds_scored_alone_equal_the_full_matrix_and_its_coco_1k_metrics(twinned, full, n_folds):
    model, tok, split, _ = twinned
    c2i = torch.as_tensor(split.caption_to_image).long()
    enc = encode_split(model, split, tok, DATA)
    folds = score_folds(model, *enc, c2i, n_folds, block_images=3, block_texts=11)
    assert len(folds) == n_folds
    for k, (rows, caps, sub) in enumerate(folds):
        size = 20 // n_folds
        assert (rows.start, rows.stop) == (k * size, (k + 1) * size)
        assert torch.equal(caps, torch.nonzero((c2i >= rows.start) & (c2i < rows.stop)).reshape(-1))
        assert torch.allclose(sub, full[rows][:, caps], atol=1e-5, rtol=0)
    got, ref = evaluate_folds(folds, c2i), evaluate_protocol(full, c2i, "coco_1k", n_folds=n_folds)
    assert got["rsum"] == pytest.approx(ref["rsum"]) and len(got["folds"]) == n_folds
    assert [f["rsum"] for f in got["folds"]] == pytest.approx([f["rsum"] for f in ref["folds"]])


def test_twin_accuracy_from_the_twin_pairs_equals_the_full_matrix(twinned, full):
    model, tok, split, twins = twinned
    c2i = torch.as_tensor(split.caption_to_image).long()
    enc = encode_split(model, split, tok, DATA)
    ref = twin_accuracy(full, c2i, twins)
    # a plain loop over captions on the full matrix
    hits = [float(full[int(c2i[c]), c] > full[twins[int(c2i[c])], c]) for c in range(len(c2i)) if twins[int(c2i[c])] >= 0]
    assert ref == pytest.approx(100 * sum(hits) / len(hits))
    for chunk in (1, 7, 1000):  # chunks of captions whose images and twins scatter over the split
        assert twin_accuracy_encoded(model, *enc, c2i, twins, chunk_captions=chunk, block_images=2) == ref
    assert twin_accuracy_encoded(model, *enc, c2i, np.full(len(twins), -1)) is None


def test_fold_count():
    assert fold_count(1000, 200) == 5 and fold_count(200, 200) == 1 and fold_count(4, 200) == 1
    assert fold_count(1000, 0) == 1
    with pytest.raises(ValueError, match=r"the test split of data/x has 300 images.*folds of 200"):
        fold_count(300, 200, where="the test split of data/x")


@pytest.mark.slow  # trains a tiny model
def test_a_finished_run_is_evaluated_again_not_retrained_when_the_folds_change(tmp_path):
    data = tmp_path / "synth"
    write_dataset(data, SynthConfig(seed=1, train_images=12, dev_images=4, test_images=8, render_images=False))
    entries = (DemoEntry("VSE", ["model.name=vse", "train.shortlist_loss_weight=0"]),)
    small = ("model.embed_size=16", "model.word_dim=8", "train.epochs=1", "train.batch_size=10")
    out = tmp_path / "demo"
    events = []
    whole = run_demo(data, out, entries=entries, extra_overrides=small, fold_images=0, build_index=False,
                     on_event=events.append)
    assert whole["test"] == {"images": 8, "captions": 40, "folds": 1, "fold_images": 8}
    best = out / "vse" / "best.pt"
    stamp = best.stat().st_mtime_ns
    events.clear()
    folded = run_demo(data, out, entries=entries, extra_overrides=small, fold_images=2, build_index=False,
                      on_event=events.append)
    assert "already trained" in events[0] and "evaluating it on this test split" in events[0]
    assert best.stat().st_mtime_ns == stamp
    row = folded["rows"][0]
    assert folded["test"]["folds"] == 4 and len(row["folds"]) == 4 and row["test"] == folded["test"]
    assert row["train_seconds"] == whole["rows"][0]["train_seconds"]  # the training record is kept
    assert row["rsum"] == pytest.approx(np.mean([f["rsum"] for f in row["folds"]]))
    assert row["rsum"] >= whole["rows"][0]["rsum"]  # each query ranked among a quarter of the candidates
    assert json.loads((out / "vse" / "result.json").read_text())["test"]["folds"] == 4
    with pytest.raises(ValueError, match="8 images"):
        run_demo(data, out, entries=entries, extra_overrides=small, fold_images=3, build_index=False)


def test_table_note_names_the_runs_recipe():
    from tvrn.demo import table_note

    note = table_note([{"config": {"train": {"seed": 3, "epochs": 2}}}, {"config": {"train": {"seed": 3, "epochs": 2}}}])
    assert note.startswith("2 epochs of each model") and "train.seed 3," in note
