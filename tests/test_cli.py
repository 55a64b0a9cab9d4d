"""End to end through the CLI and the pipeline: synth -> train (paper preset) -> eval -> ensemble; demo."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tvrn.cli import main
from tvrn.data import load_split
from tvrn.data.synth import SynthConfig, write_dataset
from tvrn.demo import DEMO_ENTRIES, DemoEntry, format_table, run_demo, twin_accuracy


@pytest.fixture(scope="module")
def paper_shaped(tmp_path_factory):
    """A tiny folder in the precomp layout at paper feature shapes (R=36, Dv=2048)."""
    root = tmp_path_factory.mktemp("paper_precomp")
    write_dataset(root, SynthConfig(seed=3, train_images=4, dev_images=2, test_images=2, regions=36,
                                    feature_dim=2048, render_images=False, twin_fraction=0.0))
    return root


@pytest.fixture(scope="module")
def trained(paper_shaped, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tvrn"
    rc = main(["train", "--config", "tvrn_sgr_f30k_gru", "--data", str(paper_shaped),
               "--set", f"data.vocab={paper_shaped / 'vocab.json'}", "--set", "train.tensorboard=false",
               "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.mark.slow  # trains at the paper's shapes (the `trained` fixture)
def test_train_with_paper_preset_writes_run(trained):
    run = json.loads((trained / "run.json").read_text())
    assert run["model"]["name"] == "tvrn_sgr"
    assert run["train"]["lr"] == 2e-4 and run["train"]["lr_milestones"] == [20]  # the preset's values
    assert run["train"]["epochs"] == 1  # the flag's override
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    assert ckpt["config"]["model"]["embed_size"] == 1024 and ckpt["config"]["model"]["img_dim"] == 2048
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["kind"] == "epoch"] == [0]


@pytest.mark.slow  # the `trained` fixture
def test_eval_checkpoint_and_ensemble(trained, paper_shaped, tmp_path, capsys):
    out1, npy = tmp_path / "m.json", tmp_path / "s.npy"
    assert main(["eval", str(trained / "best.pt"), "--data", str(paper_shaped), "--split", "test",
                 "--protocol", "f30k_1k", "--out", str(out1), "--save-scores", str(npy), "--no-progress"]) == 0
    single = json.loads(out1.read_text())
    assert single["protocol"] == "f30k_1k" and 0 <= single["rsum"] <= 600
    scores = np.load(npy)
    assert scores.shape == (2, 10)
    # an ensemble of the checkpoint and its own saved scores averages equal matrices: same metrics
    out2 = tmp_path / "e.json"
    assert main(["eval", str(trained / "best.pt"), str(npy), "--data", str(paper_shaped), "--out", str(out2),
                 "--no-progress"]) == 0
    ens = json.loads(out2.read_text())
    assert {k: ens[k] for k in ("rsum", "i2t/R@1", "t2i/meanr")} == {k: single[k] for k in ("rsum", "i2t/R@1", "t2i/meanr")}
    assert "RSUM" in capsys.readouterr().out


@pytest.mark.slow  # the `trained` fixture
def test_eval_two_stage_reports_against_exact(trained, paper_shaped, tmp_path, capsys):
    """Shortlists as large as the gallery re-rank everything: two-stage equals exact; smaller ones score fewer
    pairs (the ranking itself is checked against loops in test_twostage.py)."""
    out = tmp_path / "m.json"
    assert main(["eval", str(trained / "best.pt"), "--data", str(paper_shaped), "--out", str(out),
                 "--two-stage", "2:10", "1:3", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    full, small = res["two_stage"]
    assert (full["k_images"], full["k_texts"], full["fraction"], full["pairs_scored"]) == (2, 10, 1.0, 20)
    assert full["rsum"] == pytest.approx(res["rsum"]) and full["exact/rsum"] == pytest.approx(res["rsum"])
    assert small["pairs_scored"] < 20 and small["fraction"] == small["pairs_scored"] / 20
    assert "two-stage" in capsys.readouterr().out
    npy = tmp_path / "s.npy"
    np.save(npy, np.zeros((2, 10), dtype=np.float32))
    assert main(["eval", str(npy), "--data", str(paper_shaped), "--two-stage", "1:3", "--no-progress"]) == 2
    assert "one checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(npy), "--data", str(paper_shaped), "--two-stage", "5x25"])
    assert "K_IMAGES:K_TEXTS" in capsys.readouterr().err


def test_eval_rejects_score_matrix_of_wrong_shape(paper_shaped, tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 7), dtype=np.float32))
    assert main(["eval", str(bad), "--data", str(paper_shaped), "--no-progress"]) == 2
    assert "bad.npy" in capsys.readouterr().err


def test_train_reports_bad_config_key(paper_shaped, capsys):
    rc = main(["train", "--config", "tvrn_synth", "--data", str(paper_shaped), "--set", "train.no_such_key=1"])
    assert rc == 2 and "no_such_key" in capsys.readouterr().err


def test_twin_accuracy_matches_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 20, generator=g)
    c2i = torch.arange(20) // 5
    twin_of = np.array([2, -1, 0, -1])
    expect = []
    for c in range(20):
        i = int(c2i[c])
        if twin_of[i] >= 0:
            expect.append(float(scores[i, c] > scores[twin_of[i], c]))
    assert twin_accuracy(scores, c2i, twin_of) == pytest.approx(100 * sum(expect) / len(expect))
    assert twin_accuracy(scores, c2i, np.full(4, -1)) is None


@pytest.mark.slow  # trains the demo's models
def test_demo_runs_tiny(tmp_path):
    data = tmp_path / "synth"
    write_dataset(data, SynthConfig(seed=1, train_images=12, dev_images=4, test_images=4, render_images=False))
    entries = (DemoEntry("TVRN", ["model.name=tvrn_sgr"]), DemoEntry("VSE", ["model.name=vse"]))
    small = ("model.embed_size=16", "model.sim_dim=8", "model.word_dim=8", "train.epochs=2", "train.batch_size=10")
    out = tmp_path / "demo"
    summary = run_demo(data, out, entries=entries, extra_overrides=small)
    assert [r["label"] for r in summary["rows"]] == ["TVRN", "VSE"]
    assert (out / "dev_rsum.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == "tvrn_sgr"
    table = format_table(summary["rows"])
    assert table.count("\n") == 3 and "| TVRN |" in table
    # a second run reuses the finished runs instead of retraining
    again = run_demo(data, out, entries=entries, extra_overrides=small)
    assert again["rows"] == summary["rows"]
    # ... but not when the config changed
    changed = run_demo(data, out, entries=entries[1:], extra_overrides=small + ("train.lr=0.01",))
    assert changed["rows"][0]["config"]["train"]["lr"] == 0.01


@pytest.mark.slow  # trains the demo's models
def test_demo_command_end_to_end_on_a_tiny_configuration(tmp_path, capsys):
    """`tvrn demo` as `make demo` runs it, every real step at tiny sizes: the benchmark generated, the three
    models trained and evaluated, the table, the curves, TVRN's test index built and the serve command printed;
    the index answers a query with the run's model; run.json records the CPU kernels."""
    from tvrn.cli import main
    from tvrn.search.index import SearchIndex

    data, out = tmp_path / "synth", tmp_path / "runs"
    write_dataset(data, SynthConfig(seed=3, train_images=12, dev_images=4, test_images=4))
    tiny = ["model.embed_size=16", "model.sim_dim=8", "model.word_dim=8", "train.epochs=1", "train.batch_size=10"]
    args = ["demo", "--data", str(data), "--out", str(out), "--fold-images", "2", *[a for o in tiny for a in ("--set", o)]]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "4 images (mean of 2 folds of 2 images, each against its own captions)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == [e.label for e in DEMO_ENTRIES]
    assert "dev RSUM curves: " + str(out / "dev_rsum.png") in text
    assert f"serve {out / 'test.index'}" in text and "http://127.0.0.1:8000/" in text
    index = SearchIndex.load(out / "test.index")
    assert (index.num_images, index.num_captions) == (4, 20) and index.model_name == "tvrn_sgr"
    assert len(index.search_text("a red cat", k=3)) == 3
    env = json.loads((out / "tvrn" / "run.json").read_text())["env"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "cpu_model" in env
    summary = json.loads((out / "results.json").read_text())
    assert summary["index"] == str(out / "test.index") and summary["env"]["threads"] == torch.get_num_threads()
    # again: every run and the index are reused, nothing retrained
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("already trained") == len(DEMO_ENTRIES) and "search index: already built" in again


@pytest.mark.slow  # torchrun, two training processes
def test_train_cli_under_torchrun_two_cpu_ranks(tmp_path):
    """The real entry point under torchrun (gloo, 2 processes): rank 0 writes the run, training completes."""
    import subprocess
    import sys

    data = tmp_path / "synth"
    write_dataset(data, SynthConfig(seed=2, train_images=8, dev_images=2, test_images=2, render_images=False))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tvrn.cli",
           "train", "--config", "tvrn_synth", "--data", str(data), "--out", str(out), "--epochs", "1",
           "--batch-size", "4", "--no-progress", "--set", "model.embed_size=16", "--set", "model.sim_dim=8",
           "--set", "model.word_dim=8"]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tvrn train:") == 1  # only rank 0 reports
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["rng"]["world_size"] == 2
    assert ckpt["step"] == 5  # 40 captions / 2 ranks / batch 4


@pytest.mark.slow  # renders the synthetic benchmark
def test_demo_command_generates_the_benchmark_on_a_fresh_checkout(tmp_path, monkeypatch, capsys):
    """`tvrn demo` (what `make demo` runs) on a machine without data/synth: it generates the benchmark, then trains.
    Training is replaced by a stub here (test_demo_runs_tiny covers it); the generation branch and the command's
    own reporting run for real (this branch once crashed formatting the generator's timing dict)."""
    import tvrn.demo
    from tvrn.cli import main

    calls = []

    def fake_run_demo(data, out, **kw):
        calls.append((Path(data), Path(out), kw["fold_images"]))
        return {"rows": [], "plot": None, "test": {"images": 1000, "captions": 5000, "folds": 5, "fold_images": 200}}

    monkeypatch.setattr(tvrn.demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(tvrn.demo, "format_table", lambda rows: "(table)")
    data, out = tmp_path / "synth", tmp_path / "runs"
    assert main(["demo", "--data", str(data), "--out", str(out)]) == 0
    assert (data / "manifest.json").exists() and (data / "test_ims.npy").exists()
    assert len(load_split(data, "test").caption_to_image) == 5000  # the demo's benchmark: 1,000 test images
    assert calls == [(data, out, 200)]
    text = capsys.readouterr().out
    assert "generating the synthetic benchmark" in text and "done in" in text and "(table)" in text
    assert "1000 images (mean of 5 folds of 200 images, each against its own captions)" in text
