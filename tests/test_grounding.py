"""The pointing game (`tvrn.grounding`): object words written out by hand, a stub whose answers are known, and
real (untrained) models on a tiny synthetic split."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tvrn.grounding as grounding
from tvrn.data import Vocabulary, load_split, tokenize
from tvrn.data.synth import SynthConfig, generate_split, write_dataset
from tvrn.grounding import (PointingTarget, format_pointing, object_words, pointing_accuracy, pointing_game,
                            read_scenes, region_owners, token_words)
from tvrn.models import create_model
from tvrn.models.explain import PairExplanations

OBJECTS = [{"category": "cat", "colour": "red"}, {"category": "box", "colour": "blue"},
           {"category": "cat", "colour": "white"}]


@pytest.mark.parametrize("caption,want,unresolved", [
    ("a small red cat sitting on a blue box", [(2, "colour", 0), (3, "category", 0), (7, "colour", 1),
                                               (8, "category", 1)], 0),
    ("a red kitty is on top of a blue crate", [(1, "colour", 0), (2, "category", 0), (8, "colour", 1),
                                               (9, "category", 1)], 0),
    ("a cat on a box", [(4, "category", 1)], 1),  # two cats: "cat" names no single object
    ("three objects: a white cat, a blue box and a large red kitty",
     [(4, "colour", 2), (5, "category", 2), (8, "colour", 1), (9, "category", 1), (13, "colour", 0),
      (14, "category", 0)], 0),
    ("a green cat and a dog", [], 3),  # no green cat, no dog in the scene
])
def test_object_words_by_hand(caption, want, unresolved):
    got, bad = object_words(tokenize(caption), OBJECTS)
    assert got == want and bad == unresolved


def test_token_positions_of_the_vocabulary_tokenizer():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "cat"])
    pairs = token_words(vocab, "A red cat, a dog")
    assert pairs == [("a", 1), ("red", 2), ("cat", 3), (",", 4), ("a", 5), ("dog", 6)]
    ids = vocab.encode("A red cat, a dog")
    assert [ids[p] for _, p in pairs[:3]] == [vocab.word2idx[w] for w in ("a", "red", "cat")]


def test_pointing_accuracy_by_hand():
    """Two pairs; the pointed region of each token written out; 3 of 5 object words hit."""
    pointed = torch.tensor([[0, 4, 4, 9, 1],
                            [2, 2, 7, 7, 0]])  # (P, L) token -> most attended region
    targets = [PointingTarget(0, 1, "red", "colour", 0, (4, 5)),  # hit
               PointingTarget(0, 2, "cat", "category", 0, (4, 5)),  # hit
               PointingTarget(0, 3, "box", "category", 1, (1, 2)),  # miss (9)
               PointingTarget(1, 2, "blue", "colour", 1, (7, 8)),  # hit
               PointingTarget(1, 4, "ball", "category", 2, (3, 6))]  # miss (0)
    out = pointing_accuracy(pointed, targets, torch.tensor([10, 8]))
    assert out["hits"] == 3 and out["words"] == 5 and out["accuracy"] == pytest.approx(60.0)
    assert out["category"] == {"accuracy": pytest.approx(100 / 3), "words": 3}
    assert out["colour"] == {"accuracy": pytest.approx(100.0), "words": 2}
    assert out["chance"] == pytest.approx(100 * (2 / 10 * 3 + 2 / 8 * 2) / 5)
    assert pointing_accuracy(pointed, [])["accuracy"] is None


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding") / "data"
    write_dataset(root, SynthConfig(seed=3, train_images=12, dev_images=2, test_images=10, regions=10,
                                    feature_dim=24, image_size=64, render_images=False))
    return root, Vocabulary.load(root / "vocab.json")


def test_region_owners_are_the_generators_and_are_checked(synth, tmp_path):
    root, _ = synth
    owners = region_owners(root, "test")
    sp = generate_split(SynthConfig(seed=3, train_images=12, dev_images=2, test_images=10, regions=10,
                                    feature_dim=24, image_size=64, render_images=False), "test")
    assert owners.shape == (10, 10) and np.array_equal(owners, sp.region_object)
    scenes = read_scenes(root, "test")
    for i, s in enumerate(scenes):  # two evidence regions per object, the rest background
        assert sorted(np.bincount(owners[i][owners[i] >= 0]).tolist()) == [2] * len(s["objects"])
    other = tmp_path / "moved"
    shutil.copytree(root, other)
    boxes = np.load(other / "test_ims_bbx.npy")
    np.save(other / "test_ims_bbx.npy", boxes + 1)  # not the generator's boxes any more
    with pytest.raises(ValueError, match="cannot be recovered"):
        region_owners(other, "test")


def _stub(point):
    """An explain_pairs stand-in whose attention puts all weight on region point(image, caption, token position)."""

    def explain_pairs(model, images, texts):
        P, L = texts.tokens.shape
        R = images.features.shape[1]
        att = torch.zeros(P, L, R)
        for p in range(P):
            for pos in range(L):
                att[p, pos, point(int(images.index[p]), int(texts.index[p]), pos)] = 1.0
        return PairExplanations(model="stub", score=torch.zeros(P), tokens=texts.tokens, word_mask=texts.mask,
                                region_mask=images.mask, attention=att)

    return explain_pairs


def test_pointing_game_with_known_answers(synth, monkeypatch):
    """Stubs of the explanation through the real batching, token positions and region bookkeeping: one that
    points each object word at its object's colour region (100%), one that points everything at a background
    region (0%), one at region 0 (the share of words whose object owns region 0, counted here by hand)."""
    root, vocab = synth
    owners = region_owners(root, "test")
    data = load_split(root, "test")
    kind = generate_split(SynthConfig(seed=3, train_images=12, dev_images=2, test_images=10, regions=10,
                                      feature_dim=24, image_size=64, render_images=False), "test").region_kind
    scenes = read_scenes(root, "test")
    model = create_model("scan_t2i", img_dim=24, embed_size=8, vocab_size=len(vocab))
    meant = {}  # (caption, token position) -> object, from the captions' text (<start> is position 0)
    for c, cap in enumerate(data.captions):
        found, _ = object_words(tokenize(cap), scenes[int(data.caption_to_image[c])]["objects"])
        meant.update({(c, j + 1): obj for j, _, obj in found})
    background = [int(np.flatnonzero(owners[i] == -1)[0]) for i in range(len(owners))]

    def oracle(img, cap, pos):
        if (cap, pos) not in meant:
            return background[img]
        return int(np.flatnonzero((owners[img] == meant[cap, pos]) & (kind[img] == 1))[0])  # its colour region

    monkeypatch.setattr(grounding, "explain_pairs", _stub(oracle))
    res = pointing_game(model, vocab, root, "test", batch_size=7)
    assert res["words"] == len(meant) > 50 and res["hits"] == res["words"] and res["accuracy"] == 100.0
    assert res["pairs"] == len({c for c, _ in meant}) and res["split"] == "test"
    assert res["colour"]["words"] > 0 and res["category"]["words"] > 0

    monkeypatch.setattr(grounding, "explain_pairs", _stub(lambda img, cap, pos: background[img]))
    res = pointing_game(model, vocab, root, "test", batch_size=64)
    assert res["hits"] == 0 and res["accuracy"] == 0.0
    assert res["chance"] == pytest.approx(100 * 2 / 10)  # two evidence regions of ten

    monkeypatch.setattr(grounding, "explain_pairs", _stub(lambda img, cap, pos: 0))
    res = pointing_game(model, vocab, root, "test", batch_size=3)
    want = sum(int(owners[int(data.caption_to_image[c])][0]) == obj for (c, _), obj in meant.items())
    assert res["hits"] == want and 0 < want < len(meant)


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_saf", "scan_t2i", "scan_i2t"])
def test_pointing_game_runs_on_untrained_models(synth, name):
    root, vocab = synth
    torch.manual_seed(0)
    model = create_model(name, img_dim=24, embed_size=16, sim_dim=8, word_dim=8, vocab_size=len(vocab))
    full = pointing_game(model, vocab, root, "test", batch_size=16)
    assert 0 <= full["accuracy"] <= 100 and full["words"] == full["category"]["words"] + full["colour"]["words"]
    assert full["words"] > 50 and full["pairs"] <= 50
    again = pointing_game(model, vocab, root, "test", batch_size=5)  # batching changes nothing
    assert again == full
    assert "pointing game:" in format_pointing(full)
    json.dumps(full)


def test_pointing_game_is_none_without_scenes_or_alignment(synth, tmp_path):
    root, vocab = synth
    assert pointing_game(create_model("vse", img_dim=24, embed_size=8, vocab_size=len(vocab)), vocab, root) is None
    other = tmp_path / "plain"
    shutil.copytree(root, other)
    (other / "test_scenes.jsonl").unlink()
    model = create_model("scan_t2i", img_dim=24, embed_size=8, vocab_size=len(vocab))
    assert pointing_game(model, vocab, other, "test") is None


def test_eval_reports_the_pointing_game(synth, tmp_path, capsys):
    """`tvrn eval` on a synthetic split prints the pointing game and writes it with --out; --no-pointing-game and
    score matrices (.npy) leave the output as it was."""
    from tvrn.cli import main
    from tvrn.checkpoint import save_model

    root, vocab = synth
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", img_dim=24, embed_size=16, sim_dim=8, word_dim=8, vocab_size=len(vocab))
    ckpt = tmp_path / "model.pt"
    save_model(ckpt, "tvrn_sgr", model, vocab)
    out = tmp_path / "m.json"
    assert main(["eval", str(ckpt), "--data", str(root), "--no-progress", "--out", str(out),
                 "--save-scores", str(tmp_path / "s.npy")]) == 0
    printed = capsys.readouterr().out
    want = pointing_game(model.eval(), vocab, root, "test")
    assert format_pointing(want) in printed
    assert json.loads(out.read_text())["pointing_game"]["hits"] == want["hits"]
    assert main(["eval", str(ckpt), "--data", str(root), "--no-progress", "--no-pointing-game"]) == 0
    assert "pointing game" not in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "s.npy"), "--data", str(root), "--no-progress"]) == 0
    assert "pointing game" not in capsys.readouterr().out
