"""A new user's runs that went wrong quietly or with a traceback: early stopping not reported, coco_1k on a small
split, a checkpoint used on data of another feature size, --resume with the data folder spelled differently, a
caption file that is not UTF-8, an index of a model trained on another extraction recipe. Each is refused (status
2, one line naming the file or option, no traceback) or reported."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tvrn.cli import main
from tvrn.data import PrecompSplit, TvrnDataError, load_split
from tvrn.data.errors import TextEncodingError
from tvrn.models import create_model
from tvrn.checkpoint import save_model
from helpers import assert_refused, run_cli, tiny_synth


def refused_in_one_line(rc, err, *names):
    assert_refused(rc, err, *names, one_line=True)


SMALL = ["--set", "model.embed_size=16", "--set", "model.word_dim=8", "--set", "train.tensorboard=false",
         "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic precomp folder (8 regions of 32 features; test: 4 images) and its vocabulary."""
    root = tmp_path_factory.mktemp("runs")
    data, vocab = tiny_synth(root)
    return root, data, vocab


def _checkpoint(path, vocab, name="vse", **config):
    torch.manual_seed(0)
    model = create_model(name, vocab_size=len(vocab), **config)
    save_model(path, name, model, vocab)
    return path


# ------------------------------------------------------------------ 1. early stopping is reported
def test_early_stop_is_said_in_the_summary_and_by_tvrn_train(tiny, tmp_path, capsys):
    """lr 0: the dev RSUM never improves after epoch 0, so patience 2 stops after epoch 2 of 6."""
    _, data, _ = tiny
    rc, out, err = run_cli(["train", "--model", "vse", "--data", data, "--out", tmp_path / "run", "--epochs", "6",
                            "--lr", "0", "--set", "train.patience=2", *SMALL], capsys)
    assert rc == 0, err
    assert "3 epochs" in out
    assert ("stopped early after epoch 2 (3 of 6 epochs run): no dev RSUM gain for 2 epochs (train.patience=2); "
            "best epoch 0") in out, out


STOP_CASES = [  # (dev RSUM per epoch, epochs, patience, stopped early, reason)
    ([10.0, 30.0, 20.0, 25.0, 5.0, 50.0], 6, 2, True, "no dev RSUM gain for 2 epochs (train.patience=2)"),
    ([10.0, 30.0, 40.0], 3, 2, False, None),
    ([10.0, 9.0, 8.0], 3, 0, False, None),
]


@pytest.mark.parametrize("rsums,epochs,patience,stopped,reason", STOP_CASES)
def test_trainer_summary_records_why_it_stopped(tmp_path, rsums, epochs, patience, stopped, reason):
    from _train_toy import PairDataset, ToyModel, make_collate, make_split

    from tvrn.train import TrainConfig, Trainer, seed_everything

    it = iter(rsums)
    seed_everything(0)
    split = make_split(8, caps_per_image=2, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, out_dir=str(tmp_path), tensorboard=False,
                      patience=patience)
    summary = Trainer(ToyModel(), cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split),
                      validate=lambda m: {"rsum": next(it)}).fit()
    assert summary["stopped_early"] is stopped
    assert summary["stop_reason"] == reason
    assert summary["epochs_planned"] == epochs


# ------------------------------------------------------------------ 2. coco_1k needs 5 folds of 1000 images
def test_coco_1k_on_a_small_split_is_refused(tiny, tmp_path, capsys):
    _, data, _ = tiny
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros((4, 20), dtype=np.float32))
    rc, _, err = run_cli(["eval", scores, "--data", data, "--protocol", "coco_1k", "--no-progress"], capsys)
    refused_in_one_line(rc, err, "coco_1k", "has 4 images", "--protocol all", str(data))
    rc, out, err = run_cli(["eval", scores, "--data", data, "--protocol", "all", "--no-progress"], capsys)
    assert rc == 0, err


def test_coco_1k_rule_and_small_folds_from_python():
    from tvrn.evaluation import check_protocol_split, evaluate_protocol

    check_protocol_split("coco_1k", 5000)
    for protocol in ("all", "f30k_1k", "coco_5k"):
        check_protocol_split(protocol, 60)
    for n in (60, 1000, 4999, 25000):
        with pytest.raises(ValueError, match=f"has {n} images"):
            check_protocol_split("coco_1k", n)
    c2i = torch.arange(30) // 5
    res = evaluate_protocol(torch.randn(6, 30), c2i, "coco_1k", n_folds=2)  # the library still folds small splits
    assert len(res["folds"]) == 2


# ------------------------------------------------------------------ 3. a checkpoint of another feature size
MISFITS = [  # (model name, config, what stderr must name besides the files)
    ("vse", dict(img_dim=16, embed_size=16, word_dim=8), ["size 16", "size 32"]),
    ("tvrn_sgr", dict(img_dim=32, embed_size=16, sim_dim=8, word_dim=8, image_pool_norm="batch",
                      image_pool_tokens=72), ["72 token slots", "8 regions", "16 tokens"]),
    ("sgraf_sgr", dict(img_dim=32, embed_size=16, sim_dim=8, word_dim=8, image_pool_norm="batch",
                       image_pool_tokens=16), ["16 token slots", "8 regions", "give 8 tokens"]),
]


@pytest.mark.parametrize("command", ["eval", "index"])
@pytest.mark.parametrize("name,config,names", MISFITS, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISFITS)])
def test_checkpoint_on_data_of_another_size_is_refused(tiny, tmp_path, capsys, command, name, config, names):
    _, data, vocab = tiny
    ckpt = _checkpoint(tmp_path / "misfit.pt", vocab, name, **config)
    argv = ["eval", ckpt, "--data", data, "--no-progress"] if command == "eval" else \
        ["index", ckpt, "--data", data, "--out", tmp_path / "x.index", "--no-progress"]
    rc, _, err = run_cli(argv, capsys)
    refused_in_one_line(rc, err, f"tvrn {command}:", "misfit.pt", "test_ims.npy", *names)
    assert "mat1 and mat2" not in err
    assert not (tmp_path / "x.index").exists()


@pytest.mark.parametrize("name,tokens", [("tvrn_sgr", 16), ("sgraf_sgr", 8)])
def test_batch_pooling_with_the_right_token_count_is_accepted(tiny, tmp_path, capsys, name, tokens):
    _, data, vocab = tiny
    ckpt = _checkpoint(tmp_path / "fit.pt", vocab, name, img_dim=32, embed_size=16, sim_dim=8, word_dim=8,
                       image_pool_norm="batch", image_pool_tokens=tokens)
    rc, _, err = run_cli(["eval", ckpt, "--data", data, "--no-progress"], capsys)
    assert rc == 0, err


# ------------------------------------------------------------------ 4. --resume with the data folder spelled differently
def test_resume_with_a_relative_instead_of_an_absolute_data_path(tiny, tmp_path, capsys, monkeypatch):
    root, data, _ = tiny
    out = tmp_path / "run"
    monkeypatch.chdir(root)
    argv = ["train", "--model", "vse", "--out", out, "--set", "train.patience=0", *SMALL]
    rc, _, err = run_cli([*argv, "--data", "data", "--epochs", "1"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["data"]["root"] == "data"  # the run records what was given
    rc, out_text, err = run_cli([*argv, "--data", data, "--epochs", "2", "--resume"], capsys)  # absolute now
    assert rc == 0, err
    assert "2 epochs" in out_text
    other = tmp_path / "other"  # another folder is still refused, naming the key
    shutil.copytree(data, other)
    rc, _, err = run_cli([*argv, "--data", other, "--epochs", "3", "--resume"], capsys)
    refused_in_one_line(rc, err, "cannot resume", "data.root")


RESUME_PATHS = [  # (saved value, current value, conflict)
    ("data", "{root}/data", False),
    ("{root}/data", "data", False),  # an old run.json with an absolute path
    ("./data/", "data", False),
    ("{root}/link", "data", False),  # a symlink to the same folder
    ("data", "{root}/elsewhere", True),
    (None, "data", True),
]


@pytest.mark.parametrize("key", ["data.root", "data.vocab", "train.partner_file"])
@pytest.mark.parametrize("saved,current,conflict", RESUME_PATHS)
def test_resume_compares_the_files_paths_name(tmp_path, monkeypatch, key, saved, current, conflict):
    from tvrn.config import resume_conflicts

    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    section, name = key.split(".")

    def config(value):
        return {section: {name: value.format(root=tmp_path) if value else value}}

    assert resume_conflicts(config(saved), config(current)) == ([key] if conflict else [])


# ------------------------------------------------------------------ 5. captions that are not UTF-8
@pytest.fixture
def not_utf8(tiny, tmp_path):
    """A copy of the tiny data whose test and train captions have a 0xff byte at offset 30 (line 2)."""
    _, data, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    for name in ("test_caps.txt", "train_caps.txt"):
        raw = (bad / name).read_bytes()
        assert raw.index(b"\n") < 30 < raw.index(b"\n", raw.index(b"\n") + 1)  # offset 30 is on line 2
        (bad / name).write_bytes(raw[:30] + b"\xff" + raw[31:])
    return bad


@pytest.mark.parametrize("command", ["eval", "index", "train"])
def test_captions_not_utf8_name_file_line_and_byte(tiny, not_utf8, tmp_path, capsys, command):
    root, data, vocab = tiny
    ckpt = _checkpoint(tmp_path / "m.pt", vocab, img_dim=32, embed_size=16, word_dim=8)
    argv = {"eval": ["eval", ckpt, "--data", not_utf8, "--no-progress"],
            "index": ["index", ckpt, "--data", not_utf8, "--out", tmp_path / "x.index", "--no-progress"],
            "train": ["train", "--model", "vse", "--data", not_utf8, "--out", tmp_path / "run", "--epochs", "1",
                      *SMALL]}[command]
    rc, _, err = run_cli(argv, capsys)
    split = "train" if command == "train" else "test"
    refused_in_one_line(rc, err, f"tvrn {command}:", str(not_utf8 / f"{split}_caps.txt"), "not UTF-8", "line 2",
                   "byte offset 30", "0xff")


TEXT_FILES = [  # (bytes of the file, line, offset)
    (b"a cat\nb \xc3\x28 dog\n", 2, 8),  # a broken two-byte sequence
    (b"a cat\r\nsecond\r\nthird \xff\r\n", 3, 21),  # CRLF lines count once
    (b"one\rtwo\xfe\n", 2, 7),  # a lone CR ends a line, as a text-mode read sees it
    (b"\xe2\x82\xac euro\nfine\nbad \x80", 3, 18),  # valid multi-byte text before it
]


@pytest.mark.parametrize("raw,line,offset", TEXT_FILES)
def test_precomp_text_not_utf8_is_a_data_error(tmp_path, precomp_write, raw, line, offset):
    precomp_write(tmp_path, "test", n_images=1)
    (tmp_path / "test_caps.txt").write_bytes(raw)
    with pytest.raises(TextEncodingError) as e:
        PrecompSplit(tmp_path, "test")
    assert isinstance(e.value, TvrnDataError)
    assert (e.value.line_number, e.value.byte_offset, e.value.byte) == (line, offset, raw[offset])
    assert str(tmp_path / "test_caps.txt") in str(e.value) and f"line {line}" in str(e.value)


def test_ids_and_caption_map_not_utf8_name_their_file(tmp_path, precomp_write):
    precomp_write(tmp_path, "test", n_images=2)
    (tmp_path / "test_ids.txt").write_bytes(b"1000\n10\xff7\n")
    with pytest.raises(TextEncodingError, match=r"test_ids\.txt is not UTF-8 text: line 2, byte 0xff at byte offset 7"):
        load_split(tmp_path, "test")
    (tmp_path / "test_ids.txt").unlink()
    (tmp_path / "test_cap2img.txt").write_bytes(b"0\n" * 5 + b"1\n" * 4 + b"\xff\n")
    with pytest.raises(TextEncodingError, match=r"test_cap2img\.txt .*line 10"):
        load_split(tmp_path, "test")


def test_caption_file_offset_counts_from_the_file_start_with_a_bom(tmp_path):
    from tvrn.data.captions import CaptionFileError, read_captions

    p = tmp_path / "c.csv"
    p.write_bytes(b"\xef\xbb\xbfimage,caption\na.jpg,ok\nb.jpg,caf\xe9\n")
    with pytest.raises(CaptionFileError, match=r"c\.csv, line 3: not UTF-8 text \(byte 0xe9 at byte offset 35"):
        read_captions(p)


# ------------------------------------------------------------------ 6. an index of a model trained on another recipe
def _manifest(folder, regions):
    from tvrn.extract import Recipe

    recipe = Recipe(regions=regions) if regions == "selective_search" else Recipe(grid=(1, 2, 3, 4))
    (folder / "manifest.json").write_text(json.dumps({
        "format": "tvrn-extract", "version": 1, "splits": {},
        "extractor": {"recipe": recipe.to_dict(), "backbone": {"weights_sha256": "0" * 64}}}))


@pytest.mark.parametrize("build", ["cli", "build", "build_to"])
def test_index_of_a_model_trained_on_another_recipe_is_refused(tiny, tmp_path, capsys, build):
    from tvrn.search import SearchIndex, SearchIndexError

    _, data, vocab = tiny
    gallery, trained_on = tmp_path / "gallery", tmp_path / "trained_on"
    shutil.copytree(data, gallery)
    trained_on.mkdir()
    _manifest(gallery, "grid")  # 30 grid regions
    _manifest(trained_on, "selective_search")  # 36 proposals
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _checkpoint(run / "best.pt", vocab, img_dim=32, embed_size=16, word_dim=8)
    (run / "run.json").write_text(json.dumps({"data": {"root": str(trained_on)}}))  # the model's training data
    out = tmp_path / "x.index"
    names = [str(gallery / "manifest.json"), str(trained_on / "manifest.json"), "best.pt", "selective_search",
             "grid", "num_regions: 36 != 30"]
    if build == "cli":
        rc, _, err = run_cli(["index", ckpt, "--data", gallery, "--out", out, "--no-progress"], capsys)
        refused_in_one_line(rc, err, "tvrn index:", *names)
    else:
        with pytest.raises(SearchIndexError) as e:
            if build == "build":
                SearchIndex.build(ckpt, gallery, "test")
            else:
                SearchIndex.build_to(out, ckpt, gallery, "test")
        for name in names:
            assert name in str(e.value)
    assert not out.exists()
    _manifest(trained_on, "grid")  # the same recipe: indexed, and text queries answered
    rc, _, err = run_cli(["index", ckpt, "--data", gallery, "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    (trained_on / "manifest.json").unlink()  # the model's recipe unknown: indexed as before
    rc, _, err = run_cli(["index", ckpt, "--data", gallery, "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
