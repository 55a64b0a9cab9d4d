"""Checkpoints: plain data, atomic writes, RNG round trip, and a real SIGKILL + resume that must end with the
same weights, bit for bit, as an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tvrn.checkpoint import atomic_save, load_checkpoint
from tvrn.train.state import get_rng_state, set_rng_state

TESTS = Path(__file__).parent

SCRIPT = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from _train_toy import PairDataset, ToyModel, make_collate, make_split, make_validate
from tvrn.train import Trainer, TrainConfig, seed_everything

out, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
seed_everything(0)
model = ToyModel(dropout=0.3)
split = make_split(16, caps_per_image=2, seed=0)  # 32 pairs -> 4 batches of 8 per epoch
collate = make_collate(split)

def slow_collate(idx):
    time.sleep(delay)
    return collate(idx)

cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, lr_milestones=[2], lr_gamma=0.1, warmup_steps=3,
                  deterministic=True, save_every_steps=3, patience=0, out_dir=out, tensorboard=False)
trainer = Trainer(model, cfg, train_dataset=PairDataset(split), collate_fn=slow_collate,
                  validate=make_validate(make_split(6, caps_per_image=2, seed=1)))
summary = trainer.fit(resume=resume)
with open(out + "/summary.json", "w") as f:
    json.dump(summary, f)
"""


def test_atomic_save_and_weights_only(tmp_path):
    obj = {"a": torch.arange(3), "b": {"c": [1, 2.5, None, "x"]}, "rng": get_rng_state()}
    atomic_save(obj, tmp_path / "sub" / "x.pt")
    atomic_save(obj, tmp_path / "sub" / "x.pt")  # overwrite
    assert os.listdir(tmp_path / "sub") == ["x.pt"]
    back = load_checkpoint(tmp_path / "sub" / "x.pt")  # weights_only=True
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"]


def test_rng_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leave a cached gaussian state behind
    state = get_rng_state()
    atomic_save(state, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2] and want[3] == got[3]


def _start(script, out, resume, delay):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(script), str(out), "1" if resume else "0", str(delay)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _finish(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow  # three training processes
def test_kill_and_resume_is_bit_exact(tmp_path):
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    ref = _start(script, ref_dir, False, 0.0)  # the uninterrupted run, in parallel with the killed one
    victim = _start(script, run_dir, False, 0.5)  # slow batches: plenty of time to kill mid-epoch
    last = run_dir / "last.pt"
    deadline = time.time() + 60
    while not last.exists():
        assert victim.poll() is None, victim.communicate()[1].decode()[-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(last)
    assert killed_at["step"] == 3 and (killed_at["epoch"], killed_at["batch"]) == (0, 3)  # mid-epoch
    assert not (run_dir / "summary.json").exists()

    _finish(_start(script, run_dir, True, 0.0))
    _finish(ref)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(last) and summary["steps"] == 12
    a, b = load_checkpoint(ref_dir / "last.pt"), load_checkpoint(run_dir / "last.pt")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit for bit
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k])
    assert a["metrics"] == b["metrics"]

    def epochs(d):
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k != "time"} for x in lines if x["kind"] == "epoch"]

    assert epochs(ref_dir) == epochs(run_dir)  # same losses and dev metrics, no duplicated lines


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path):
    from tvrn.models import create_model
    from tvrn.checkpoint import atomic_save, load_checkpoint, state_digest

    model = create_model("sgraf_sgr", img_dim=8, embed_size=8, sim_dim=4, word_dim=4, vocab_size=10,
                         image_pool_norm="batch", image_pool_tokens=3)  # a 0-dim num_batches_tracked too
    sd = {**model.state_dict(), "half": torch.ones(3, dtype=torch.bfloat16), "flag": torch.tensor([True])}
    path = tmp_path / "m.pt"
    atomic_save({"model": sd, "epoch": 1}, path)
    assert load_checkpoint(path)["model_sha256"] == state_digest(sd)
    data = bytearray(path.read_bytes())
    raw = sd["sim_eval.weight"].numpy().tobytes()
    at = bytes(data).find(raw)  # torch.save stores the tensor bytes as they are
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model weights are corrupted"):
        load_checkpoint(path)


class _NotAllowed:
    """Outside the weights_only allow-list: a checkpoint holding one is refused by the class's name."""


def _saved(tmp_path, obj=None, legacy=False) -> bytes:
    """A tvrn checkpoint's bytes (atomic_save: with model_sha256), or a torch.save of `obj`."""
    path = tmp_path / "saved.pt"
    if obj is None:
        atomic_save({"model": {"w": torch.randn(64, 64)}, "epoch": 2, "config": {"model_name": None}}, path)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _flipped_in_pickle(tmp_path) -> bytes:
    import io
    import struct
    import zipfile

    data = bytearray(_saved(tmp_path))
    info = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist() if i.filename.endswith("/data.pkl"))
    n, m = struct.unpack("<HH", bytes(data[info.header_offset + 26:info.header_offset + 30]))
    data[info.header_offset + 30 + n + m + 3] ^= 0x10  # a byte of the pickle: its CRC-32 no longer matches
    return bytes(data)


CHECKPOINT_BAD_FILES = [  # (id, bytes or a function of tmp_path making them, the phrase the error must hold)
    ("empty", b"", "is empty (0 bytes)"),
    ("text", b"epoch: 3\nloss: 0.25\n", "is not a PyTorch checkpoint (it starts with 'epoch: 3\\nloss: 0.25\\n', "
                                        "a text file?)"),
    ("binary", bytes(range(1, 40)), "is not a PyTorch checkpoint (it starts with the bytes 01 02 03"),
    ("first-half", lambda p: (lambda d: d[:len(d) // 2])(_saved(p)),
     "is truncated or damaged (not a complete zip archive: its central directory"),
    ("first-half-legacy", lambda p: (lambda d: d[:len(d) // 2])(_saved(p, {"w": torch.ones(500)}, legacy=True)),
     "is truncated or damaged (its tensor data ends early"),
    ("first-bytes-legacy", lambda p: _saved(p, {"w": torch.ones(500)}, legacy=True)[:20],
     "is truncated or damaged (its pickle stream ends early)"),
    ("refused-class", lambda p: _saved(p, {"model": {}, "extra": _NotAllowed()}),
     "_NotAllowed`, which is not allowed (only"),
    ("refused-class-legacy", lambda p: _saved(p, {"extra": _NotAllowed()}, legacy=True),
     "_NotAllowed`, which is not allowed (only"),
    ("pickle-byte-flipped", _flipped_in_pickle, "is damaged (its pickle cannot be read: "),
]


@pytest.mark.parametrize("contents,phrase", [c[1:] for c in CHECKPOINT_BAD_FILES],
                         ids=[c[0] for c in CHECKPOINT_BAD_FILES])
def test_a_bad_checkpoint_file_is_refused_saying_what_is_wrong_with_it(tmp_path, contents, phrase):
    from tvrn.convert import ConvertError, load_official
    from tvrn.checkpoint import CheckpointError, load_trained

    path = tmp_path / "bad.pt"
    path.write_bytes(contents(tmp_path) if callable(contents) else contents)
    for load, error in ((load_checkpoint, CheckpointError), (load_trained, CheckpointError),
                        (load_official, ConvertError)):
        with pytest.raises(error) as caught:
            load(path)
        message = str(caught.value)
        assert isinstance(caught.value, ValueError)  # the CLI's exit-status-2 path
        assert str(path) in message and phrase in message, message
        assert "weights_only" not in message and "Traceback" not in message


def test_a_good_checkpoint_still_loads_and_a_missing_one_is_file_not_found(tmp_path):
    path = tmp_path / "good.pt"
    path.write_bytes(_saved(tmp_path))
    assert load_checkpoint(path)["epoch"] == 2
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(_saved(tmp_path, {"w": torch.arange(4)}, legacy=True))
    assert torch.equal(load_checkpoint(legacy)["w"], torch.arange(4))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")
