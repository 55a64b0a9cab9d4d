import dataclasses
import json

import pytest
import torch

from _train_toy import PairDataset, ToyModel, make_collate, make_split, make_validate
from tvrn.checkpoint import load_checkpoint
from tvrn.train import Trainer, TrainConfig, lr_at, seed_everything


def test_lr_schedule():
    # official: 2e-4 until epoch 20, then 1e-5
    cfg = TrainConfig()
    assert lr_at(19, 0, cfg.lr, cfg.lr_milestones, cfg.lr_gamma) == pytest.approx(2e-4)
    assert lr_at(20, 0, cfg.lr, cfg.lr_milestones, cfg.lr_gamma) == pytest.approx(1e-5)
    assert lr_at(35, 0, 1.0, [10, 30], 0.1) == pytest.approx(0.01)
    assert lr_at(5, 0, 1.0, [2, 4], lr_values=[3.0, 2.0, 1.0]) == 1.0
    assert lr_at(0, 0, 1.0, warmup_steps=4) == pytest.approx(0.25)
    assert lr_at(0, 3, 1.0, warmup_steps=4) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lr_at(0, 0, 1.0, [2], lr_values=[1.0])


def test_config_is_json_able():
    cfg = TrainConfig(out_dir="x", lr_values=[1e-3, 1e-4])
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"nope": 1})


def _run(tmp_path, validate=None, **kw):
    seed_everything(0)
    model = ToyModel()
    split = make_split(12, caps_per_image=2, seed=0)
    base = dict(epochs=3, batch_size=8, lr=1e-2, out_dir=str(tmp_path), tensorboard=False, patience=0)
    base.update(kw)
    cfg = TrainConfig(**base)
    trainer = Trainer(model, cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split), validate=validate)
    return model, trainer.fit()


def test_training_learns_and_writes_files(tmp_path):
    validate = make_validate(make_split(12, caps_per_image=2, seed=0))  # train-set retrieval must improve
    seed_everything(0)
    before = validate(ToyModel())["rsum"]
    model, summary = _run(tmp_path, validate=validate, epochs=4, warmup_steps=2, log_every_steps=1)
    assert summary["epochs_completed"] == 4 and summary["steps"] == 12 and not summary["stopped_early"]
    assert summary["best_rsum"] > before
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
        assert (tmp_path / name).exists(), name
    ckpt = load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    assert ckpt["epoch"] == 4 and ckpt["batch"] == 0 and ckpt["step"] == 12
    assert set(ckpt) >= {"config", "model", "optimizer", "scheduler", "metrics", "best", "rng", "vocab"}
    assert ckpt["config"]["model"] == dataclasses.asdict(model.config)
    rebuilt = ToyModel(**ckpt["config"]["model"])
    rebuilt.load_state_dict(ckpt["model"])
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"]["epoch"] == summary["best_epoch"]
    assert best["metrics"]["rsum"] == summary["best_rsum"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert [x["epoch"] for x in epochs] == [0, 1, 2, 3]
    assert all("rsum" in x and "i2t/R@1" in x and x["train/loss"] > 0 for x in epochs)
    assert len([x for x in lines if x["kind"] == "step"]) == 12


def test_best_is_kept_and_early_stopping(tmp_path):
    rsums = iter([10.0, 30.0, 20.0, 25.0, 5.0, 50.0])

    def validate(model):
        return {"rsum": next(rsums)}

    _, summary = _run(tmp_path, validate=validate, epochs=6, patience=2)
    # best at epoch 1 (30); epochs 2 and 3 do not improve -> stop after epoch 3
    assert summary["stopped_early"] and summary["epochs_completed"] == 4
    assert summary["best_epoch"] == 1 and summary["best_rsum"] == 30.0
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == 2 and best["metrics"]["rsum"] == 30.0  # not overwritten by later epochs
    assert last["epoch"] == 4 and last["metrics"]["rsum"] == 25.0
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_loader_factory_and_no_validation(tmp_path):
    split = make_split(8, caps_per_image=2, seed=0)
    collate = make_collate(split)

    def factory(epoch):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(16, generator=g).tolist()
        return [collate(perm[i : i + 4]) for i in range(0, 16, 4)]

    seed_everything(0)
    cfg = TrainConfig(epochs=2, batch_size=4, out_dir=str(tmp_path), tensorboard=False, loss_mode="smooth")
    summary = Trainer(ToyModel(), cfg, loader_factory=factory).fit()
    assert summary["steps"] == 8 and summary["best_checkpoint"] is None
    assert not (tmp_path / "best.pt").exists()
    with pytest.raises(ValueError):
        Trainer(ToyModel(), cfg)


def test_library_does_not_print(tmp_path, capsys):
    _run(tmp_path, epochs=1)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_sum_loss_epochs_switch_the_loss(tmp_path):
    """With sum_loss_epochs=1 the first epoch's loss is the sum over negatives, later ones the hardest-negative
    loss: replaying the logged steps with both losses tells them apart."""
    from tvrn.losses import ContrastiveLoss

    seen = []

    class Recording(ContrastiveLoss):
        def forward(self, scores, image_ids=None):
            seen.append((scores.detach().clone(), image_ids.clone()))
            return super().forward(scores, image_ids)

    seed_everything(0)
    split = make_split(12, caps_per_image=2, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, out_dir=str(tmp_path), tensorboard=False, patience=0,
                      loss_mode="max", sum_loss_epochs=1, log_every_steps=1)
    trainer = Trainer(ToyModel(), cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split))
    rec_max, rec_sum = Recording(0.2, "max"), Recording(0.2, "sum")
    trainer.loss_fn, trainer.warmup_loss_fn = rec_max, rec_sum
    trainer.fit()
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    steps = [x for x in steps if x["kind"] == "step"]
    assert len(seen) == len(steps) == 6
    sum_loss, max_loss = ContrastiveLoss(0.2, "sum"), ContrastiveLoss(0.2, "max")
    for (scores, ids), rec in zip(seen, steps):
        want = sum_loss if rec["epoch"] == 0 else max_loss
        other = max_loss if rec["epoch"] == 0 else sum_loss
        assert rec["train/loss"] == pytest.approx(float(want(scores, ids)), rel=1e-5)
        assert float(other(scores, ids)) != pytest.approx(rec["train/loss"], rel=1e-3)


def test_partner_order_puts_partners_next_to_each_other():
    from tvrn.train.sampling import partner_order, shard_batches

    c2i = torch.arange(40) // 5  # 8 images, 5 captions each
    partners = [3, -1, 5, 0, -1, 2, -1, -1]
    order = partner_order(c2i, partners, seed=1, epoch=2)
    assert sorted(order) == list(range(40))  # every caption once
    assert order == partner_order(c2i, partners, seed=1, epoch=2) != partner_order(c2i, partners, seed=1, epoch=3)
    follows = 0
    for k, c in enumerate(order[:-1]):
        p = partners[int(c2i[c])]
        if p >= 0 and int(c2i[order[k + 1]]) == p:
            follows += 1
    assert follows >= 10  # each of the 4 partnered images' captions brings one of its partner's (20 pairs at best)
    for rank in range(3):
        got = shard_batches(order, 4, rank, 3)
        assert len(got) == 16 and all(b in order for b in got)
    assert shard_batches(order, 4, 0, 3)[:4] == order[:4] and shard_batches(order, 4, 1, 3)[:4] == order[4:8]


def test_trainer_uses_the_order_function(tmp_path):
    seen = []
    split = make_split(6, caps_per_image=2, seed=0)
    order = list(range(11, -1, -1))  # reversed
    cfg = TrainConfig(epochs=1, batch_size=4, out_dir=str(tmp_path), tensorboard=False, patience=0)
    seed_everything(0)
    Trainer(ToyModel(), cfg, train_dataset=PairDataset(split), collate_fn=make_collate(split, seen),
            order_fn=lambda epoch: order).fit()
    assert seen == order


def test_partner_file_is_checked(tmp_path):
    from tvrn.config import ConfigError
    from tvrn.data.synth import SynthConfig, write_dataset
    from tvrn.pipeline import resolve_config, train_from_config

    data = tmp_path / "d"
    write_dataset(data, SynthConfig(seed=1, train_images=4, dev_images=2, test_images=2, render_images=False))
    bad = tmp_path / "partners.json"
    bad.write_text("[0, 1]")
    cfg = resolve_config("demo_synth", [f"data.root={data}", "model.name=vse", f"train.partner_file={bad}",
                                        "train.epochs=1"])
    with pytest.raises(ConfigError, match="expected a list of 4 image indices"):
        train_from_config(cfg, tmp_path / "run")


def test_shortlist_loss_epochs_limit_the_auxiliary_loss_to_the_first_epochs(tmp_path):
    """train.shortlist_loss_weight adds a sum-hinge loss on the shortlist cosines in every epoch, or with
    train.shortlist_loss_epochs=1 in the first epoch only; each step's logged loss is the main loss plus
    weight x the shortlist loss of that step's cosines."""
    from helpers import build, make_images, make_texts
    from tvrn.data.batch import PairBatch
    from tvrn.losses import ContrastiveLoss

    vocab_model = build("sgraf_sgr")
    data = [PairBatch(make_images(4, seed=30 + k), make_texts(vocab_model, 4, seed=40 + k), torch.arange(4) + 10 * k)
            for k in range(2)]

    def run(epochs_on):
        calls, main = [], []
        torch.manual_seed(0)
        m = build("sgraf_sgr").train()
        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, out_dir=str(tmp_path / str(epochs_on)), tensorboard=False,
                          loss_mode="max", patience=0, log_every_steps=1, shortlist_loss_weight=0.5,
                          shortlist_loss_epochs=epochs_on)
        trainer = Trainer(m, cfg, loader_factory=lambda epoch: data)

        class Recording(ContrastiveLoss):
            def __init__(self, mode, into):
                super().__init__(0.2, mode)
                self.into = into

            def forward(self, scores, image_ids=None):
                loss = super().forward(scores, image_ids)
                self.into.append((trainer._epoch, float(loss.detach())))
                return loss

        trainer.loss_fn, trainer.warmup_loss_fn = Recording("max", main), Recording("sum", calls)
        trainer.fit()
        steps = [json.loads(x) for x in (tmp_path / str(epochs_on) / "metrics.jsonl").read_text().splitlines()]
        return calls, main, [x for x in steps if x["kind"] == "step"]

    calls, main, steps = run(1)
    assert [e for e, _ in calls] == [0, 0] and [e for e, _ in main] == [0, 0, 1, 1]
    for k, rec in enumerate(steps):
        want = main[k][1] + (0.5 * calls[k][1] if k < 2 else 0.0)
        assert rec["train/loss"] == pytest.approx(want, rel=1e-6)
    calls, _, _ = run(0)
    assert [e for e, _ in calls] == [0, 0, 1, 1]

