"""Two CPU processes under torch.distributed.run (gloo): same weights afterwards, and each training item seen
exactly once per epoch across the ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvrn.distributed import DistInfo, broadcast_object, gather_objects, init_distributed

TESTS = Path(__file__).parent

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import pytest
import torch
torch.set_num_threads(1)
from _train_toy import PairDataset, ToyModel, make_collate, make_split, make_validate
from tvrn.distributed import cleanup_distributed
from tvrn.train import Trainer, TrainConfig, seed_everything

out = sys.argv[1]
rank = int(os.environ["RANK"])
seed_everything(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
model = ToyModel()
split = make_split(16, caps_per_image=2, seed=0)  # 32 pairs: 16 per rank, 4 batches of 4 per epoch
seen = []
cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, save_every_steps=3, patience=0, out_dir=out, tensorboard=False)
trainer = Trainer(model, cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split, seen),
                  validate=make_validate(make_split(6, caps_per_image=2, seed=1)))
summary = trainer.fit()
torch.save(model.state_dict(), f"{{out}}/rank{{rank}}.pt")
with open(f"{{out}}/seen{{rank}}.json", "w") as f:
    json.dump({{"seen": seen, "world": trainer.dist.world_size, "summary": summary}}, f)
cleanup_distributed()
sys.stdout.flush()
os._exit(0)  # as tvrn.cli does under torchrun: skip finalisation, where gloo's threads can abort the process
"""


def test_single_process_helpers():
    info = init_distributed()  # no torchrun env: rank 0 of 1, nothing initialised
    assert info == DistInfo() and info.is_main and not info.enabled
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert gather_objects(3) == [3]


@pytest.mark.slow  # torchrun, two ranks
def test_two_ranks_gloo(tmp_path):
    script = tmp_path / "ddp_toy.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
        env=env, capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    runs = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in runs)
    per_epoch = 16  # items per rank per epoch
    orders = []
    for epoch in range(2):
        parts = [r["seen"][epoch * per_epoch : (epoch + 1) * per_epoch] for r in runs]
        assert sorted(parts[0] + parts[1]) == list(range(32))  # every item exactly once across the ranks
        orders.append(parts[0])
    assert orders[0] != orders[1]  # set_epoch reshuffles
    # only rank 0 writes: one set of files, a full run's metrics
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["rng"]["world_size"] == 2 and len(ckpt["rng"]["states"]) == 2
    for k in w0:
        assert torch.equal(ckpt["model"][k], w0[k])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"kind": "epoch"' in x]) == 2
    assert runs[0]["summary"]["best_rsum"] == runs[1]["summary"]["best_rsum"]  # metrics broadcast to rank 1


GLOBAL_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import pytest
import torch
torch.set_num_threads(1)
from contextlib import nullcontext
from global_negatives_case import CASES, batch_of, build
from tvrn.distributed import cleanup_distributed
from tvrn.train import Trainer, TrainConfig

out = sys.argv[1]
rank = int(os.environ["RANK"])
results = {{}}
for name, mode, overrides in CASES:
    model = build(name, **overrides)
    cfg = TrainConfig(batch_size=8, out_dir=out, tensorboard=False, loss_mode=mode, memory_budget_mb=1.0)
    trainer = Trainer(model, cfg, loader_factory=lambda epoch: [])
    trainer._setup()
    assert trainer._global_negatives()  # on by default under DDP for tvrn models
    batch = batch_of(range(8 * rank, 8 * rank + 8))
    loss, total = trainer._global_loss(batch, trainer.loss_fn, nullcontext(), False)
    loss.backward()
    if rank == 0:
        results[name] = {{"loss": float(total), "grads": {{k: p.grad.tolist() for k, p in model.named_parameters()
                                                        if p.grad is not None}}}}
if rank == 0:
    with open(out + "/global.json", "w") as f:
        json.dump(results, f)
cleanup_distributed()
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow  # torchrun, two ranks
def test_global_negatives_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    """Two gloo ranks with 8 pairs each train on the loss (and gradients) of the 16-pair batch: each rank scores
    its images against every rank's captions and the reverse, with the blocked training path (float64 models;
    the loss in float32, as the trainer computes it: 1e-6)."""
    import global_negatives_case as case
    from tvrn.losses import ContrastiveLoss

    script = tmp_path / "ddp_global.py"
    script.write_text(GLOBAL_SCRIPT.format(tests=str(TESTS)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    got = json.loads((tmp_path / "global.json").read_text())
    for name, mode, overrides in case.CASES:
        model = case.build(name, **overrides)
        batch = case.batch_of(range(16))
        scores = model(batch.images, batch.texts, memory_budget_mb=1.0)
        loss = ContrastiveLoss(0.2, mode)(scores.float(), batch.image_ids)  # the trainer's loss is float32
        loss.backward()
        assert got[name]["loss"] == pytest.approx(float(loss.detach()), rel=1e-6), name
        for k, p in model.named_parameters():
            if p.grad is None:
                continue
            g = torch.tensor(got[name]["grads"][k], dtype=p.grad.dtype)
            # the published loss gives every pair a gradient: sim_eval.bias's (-0.0035) sums B x B terms of about
            # 1e-2 that cancel, so float32 rounding of the loss (as the trainer computes it) shows there at 5e-7
            floor = 1e-6 if mode == "published" else 1e-12
            assert (g - p.grad).norm() <= 1e-6 * p.grad.norm() + floor, (name, k)


@pytest.mark.slow  # torchrun, two ranks
def test_distributed_eval_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m tvrn.cli eval`: the scorer's block plan split across two gloo ranks, each
    scoring its units with the one scorer; rank 0's saved matrix equals the single-process one bit for bit."""
    import numpy as np

    from tvrn.data import Vocabulary
    from tvrn.data.synth import SynthConfig, write_dataset
    from tvrn.models import create_model
    from tvrn.checkpoint import save_model

    data = tmp_path / "synth"
    write_dataset(data, SynthConfig(seed=6, train_images=4, dev_images=2, test_images=7, render_images=False))
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", img_dim=256, embed_size=16, sim_dim=8, word_dim=8, vocab_size=len(vocab))
    ckpt = tmp_path / "m.pt"
    save_model(ckpt, "tvrn_sgr", model, vocab)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # the same threads per process on both sides: CPU reductions split by thread
    eval_args = ["-m", "tvrn.cli", "eval", str(ckpt), "--data", str(data), "--no-progress", "--save-scores"]
    one = subprocess.run([sys.executable, *eval_args, str(tmp_path / "one.npy")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *eval_args, str(tmp_path / "two.npy")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RSUM") == 1 and "2 ranks" in proc.stdout  # rank 0 reports
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == two.shape == (7, 35)
    assert np.array_equal(two, one), float(np.abs(two - one).max())
