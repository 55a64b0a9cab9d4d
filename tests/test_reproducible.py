"""One config, one result: `tvrn train` run twice as separate processes ends with bit-identical checkpoints.

Within one process a second training would already start from a seeded generator, so these tests run every
training in its own process (torch seeds its default generator from the operating system in each new one).
Thread count is pinned (OMP_NUM_THREADS=1): CPU results are only bitwise equal for one thread count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tvrn.cli import main
from tvrn.data.synth import SynthConfig, write_dataset

SMALL = ["--set", "model.embed_size=16", "--set", "model.sim_dim=8", "--set", "model.word_dim=8",
         "--set", "model.dropout=0.2", "--epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro_synth")
    write_dataset(root, SynthConfig(seed=4, train_images=8, dev_images=3, test_images=2, render_images=False))
    return root


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_concurrently(cmds, timeout=300):
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def assert_same(a, b, where="checkpoint"):
    """Every tensor bitwise equal (dtype, shape, bits), every other value equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _checkpoint(run_dir):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["config"]["train"].pop("out_dir")  # the only intended difference
    return ckpt


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_sgr", "scan_t2i", "vse"])
@pytest.mark.slow  # two training processes per model
def test_two_processes_train_bit_identical_weights(synth, tmp_path, name):
    cmds = [[sys.executable, "-m", "tvrn.cli", "train", "--config", "tvrn_synth", "--data", str(synth),
             "--model", name, "--out", str(tmp_path / f"run{k}"), *SMALL] for k in (0, 1)]
    _run_concurrently(cmds)
    a, b = _checkpoint(tmp_path / "run0"), _checkpoint(tmp_path / "run1")
    assert a["step"] == b["step"] > 0
    assert_same(a, b)
    run = json.loads((tmp_path / "run0" / "run.json").read_text())
    assert run["env"]["threads"] == 1 and run["env"]["torch"] == torch.__version__


@pytest.mark.slow  # two torchrun runs of two ranks
def test_two_torchrun_runs_of_two_gloo_ranks_are_bit_identical(synth, tmp_path):
    def cmd(k):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "tvrn.cli", "train", "--config", "tvrn_synth", "--data", str(synth), "--model", "tvrn_sgr",
                "--out", str(tmp_path / f"ddp{k}"), *SMALL]

    for k in (0, 1):  # one after the other: --standalone picks a free port, but the cores are few
        _run_concurrently([cmd(k)])
    a, b = _checkpoint(tmp_path / "ddp0"), _checkpoint(tmp_path / "ddp1")
    assert a["rng"]["world_size"] == 2
    assert_same(a, b)
    assert json.loads((tmp_path / "ddp0" / "run.json").read_text())["env"]["world_size"] == 2


def test_resume_with_another_config_is_refused_naming_the_keys(synth, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config", "tvrn_synth", "--data", str(synth), "--model", "sgraf_sgr", "--out", str(out), *SMALL]
    assert main(base) == 0
    before = (out / "run.json").read_text()
    capsys.readouterr()
    # another model size and lr: refused before anything is written, both keys named with their values
    assert main(base + ["--set", "model.embed_size=32", "--lr", "0.01", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "model.embed_size: 16 -> 32" in err and "train.lr: 0.0005 -> 0.01" in err
    assert "Traceback" not in err
    assert (out / "run.json").read_text() == before
    # more epochs is a resume, not another run
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_trainer_refuses_a_checkpoint_of_another_model_config(tmp_path):
    """The library path (Trainer.fit(resume=...)) names the differing keys instead of a state-dict traceback."""
    sys.path.insert(0, os.path.dirname(__file__))
    from _train_toy import PairDataset, ToyModel, make_collate, make_split
    from tvrn.train import Trainer, TrainConfig

    split = make_split(8, caps_per_image=2, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=8, out_dir=str(tmp_path), tensorboard=False)
    Trainer(ToyModel(), cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split)).fit()
    bigger = Trainer(ToyModel(d=16), cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split))
    with pytest.raises(ValueError, match=r"model\.d: 8 -> 16"):
        bigger.fit(resume=True)


def test_resume_of_a_run_made_before_a_config_field_existed(tmp_path):
    """A field added later (absent from the old run.json) at its default is no conflict; at another value it is."""
    from tvrn.config import resume_conflicts

    saved = {"model_name": "x", "model": {"embed_size": 16}, "train": {"lr": 0.1, "epochs": 1}}
    now = {"model_name": "x", "model": {"embed_size": 16, "word_dropout": 0.0},
           "train": {"lr": 0.1, "epochs": 2, "partner_file": None}}
    assert resume_conflicts(saved, now) == []
    now["train"]["partner_file"] = "p.json"
    now["model"]["word_dropout"] = 0.4
    assert resume_conflicts(saved, now) == ["model.word_dropout", "train.partner_file"]


@pytest.mark.slow  # three training processes
def test_resume_at_an_epoch_boundary_in_a_new_process_is_bit_identical(synth, tmp_path):
    """The module study's case: a run stopped after epoch 1 and resumed by another process (`--resume`, no
    --deterministic) ends with the checkpoint of the run that never stopped: weights, optimiser, RNG states,
    metrics (TVRN with dropout, so the restored RNG state matters)."""
    def cmd(out, epochs, *extra):
        args = [a for a in SMALL if a not in ("--epochs", "1")]
        return [sys.executable, "-m", "tvrn.cli", "train", "--config", "tvrn_synth", "--data", str(synth),
                "--model", "tvrn_sgr", "--out", str(out), *args, "--epochs", str(epochs), *extra]

    _run_concurrently([cmd(tmp_path / "whole", 2), cmd(tmp_path / "cut", 1)])
    first = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and first["batch"] == 0  # stopped at the boundary
    _run_concurrently([cmd(tmp_path / "cut", 2, "--resume")])
    a, b = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "cut")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] > first["step"]
    assert_same(a, b)
