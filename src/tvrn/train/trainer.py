"""The training loop: Adam, step schedule with warmup, clipping, AMP on CUDA, dev-RSUM selection, early stop,
atomic checkpoints with exact mid-epoch resume, DDP under torchrun.

    trainer = Trainer(model, TrainConfig(out_dir="runs/x"), train_dataset=ds, collate_fn=collate,
                      validate=lambda m: {"rsum": ...})
    summary = trainer.fit(resume=True)

Data: either a map-style `train_dataset` + `collate_fn` (items -> PairBatch), for which the trainer builds the
loader itself (a DistributedSampler seeded with `seed`, `set_epoch(epoch)`, so the order is a function of
(seed, epoch, rank, world size); a mid-epoch resume skips the indices already seen), or a
`loader_factory(epoch) -> iterable of PairBatch`, for which a resume skips the batches already seen by
iterating past them (reproducible only if the factory's order is a function of the epoch).

Files in out_dir (rank 0 only): config.json, last.pt (end of every epoch, and every `save_every_steps`),
best.pt (when dev RSUM improves; never overwritten otherwise), metrics.jsonl, tb/ (when tensorboard exists).

Determinism: with `deterministic=True` the run calls torch.use_deterministic_algorithms(True) (global), and a
run killed and resumed from last.pt ends with the same weights, bit for bit, as an uninterrupted one: the data
order comes from (seed, epoch), the RNG states of every rank are saved, and the lr is a function of the
position. Under DDP (`train.global_negatives`, on by default) each rank scores its images against every rank's
captions and every rank's images against its captions (encodings gathered with autograd), so the loss and the
gradients are those of the global batch of world x batch_size pairs, as one process would train
(tests/test_distributed.py); with it off, each rank's loss sees its own B x B only.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..config import TrainConfig, check_resume
from ..fileio import write_json
from ..losses import ContrastiveLoss
from ..checkpoint import atomic_save, load_checkpoint
from .state import get_rng_state, set_rng_state
from ..distributed import DistInfo, broadcast_object, gather_objects, init_distributed
from .runlog import RunLogger
from .sampling import shard_batches
from .task import TrainingTask
from .schedule import lr_at, set_lr


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """Global switch: deterministic algorithms (and the cuBLAS workspace setting they need on CUDA)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class Trainer:
    """Trains a retrieval model (forward(images, texts) -> (B, B) scores) with a ranking loss.

    model: nn.Module with encode_image / encode_text / score and forward; optionally `.config` (dataclass).
    config: TrainConfig.
    train_dataset + collate_fn: map-style dataset and a collate producing PairBatch; or
    loader_factory: callable epoch -> iterable of PairBatch (then the caller shards data under DDP).
    validate: callable(model) -> dict with "rsum" (and other metrics), run on rank 0 after every epoch, in eval
        mode under no_grad, on the unwrapped model; None disables selection and early stopping.
    model_name: registry name saved in the checkpoint config (create_model(name, **config["model"])).
    vocab: optional dict saved in checkpoints. device: default cuda:LOCAL_RANK when CUDA exists, else CPU.
    progress: show a tqdm bar (stderr) on rank 0. loss_fn: overrides the ContrastiveLoss built from config.
    order_fn: epoch -> the epoch's order of dataset indices (a function of the epoch; with train_dataset), instead
        of a uniform shuffle; under DDP its batch-sized blocks are dealt to the ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_dataset: Optional[Dataset] = None,
        collate_fn: Optional[Callable] = None,
        loader_factory: Optional[Callable[[int], Iterable[Any]]] = None,
        validate: Optional[Callable[[nn.Module], dict]] = None,
        model_name: Optional[str] = None,
        vocab: Optional[dict] = None,
        device: Optional[torch.device | str] = None,
        progress: bool = False,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        order_fn: Optional[Callable[[int], list]] = None,
    ) -> None:
        if (train_dataset is None) == (loader_factory is None):
            raise ValueError("give exactly one of train_dataset (with collate_fn) or loader_factory")
        self.model, self.config = model, config
        self.train_dataset, self.collate_fn, self.loader_factory = train_dataset, collate_fn, loader_factory
        self.validate, self.model_name, self.vocab = validate, model_name, vocab
        self.order_fn = order_fn  # epoch -> every dataset index once (built-in loader only); None: shuffled
        self.progress = progress
        self.loss_fn = loss_fn or ContrastiveLoss(config.margin, config.loss_mode, config.loss_tau, config.loss_reduction,
                                                  config.loss_exclude_same_image)
        self.warmup_loss_fn = ContrastiveLoss(config.margin, "sum", config.loss_tau, config.loss_reduction,
                                              config.loss_exclude_same_image)
        self._epoch = 0
        self._device_arg = device
        self.out_dir = Path(config.out_dir)

    # ---- setup -------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        self.dist: DistInfo = init_distributed()
        if self._device_arg is not None:
            self.device = torch.device(self._device_arg)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        configure_determinism(cfg.deterministic)
        seed_everything(cfg.seed + self.dist.rank)
        self.model.to(self.device)
        sparse = isinstance(self.loss_fn, ContrastiveLoss) and self.loss_fn.mode == "max"
        self.task = TrainingTask(self.model, cfg.memory_budget_mb, sparse_loss=sparse)
        if self.dist.enabled:  # DDP wraps the task: its forward is the step's
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(
                self.task, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters
            )
        else:
            self.ddp = self.task
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        cuda = self.device.type == "cuda"
        if cfg.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"amp must be 'bf16', 'fp16' or 'none', got {cfg.amp!r}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.logger = RunLogger(self.out_dir, enabled=self.dist.is_main, tensorboard=cfg.tensorboard)

    def _config_dict(self) -> dict:
        mcfg = getattr(self.model, "config", None)
        return {
            "model_name": self.model_name,
            "model": dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else None,
            "train": dataclasses.asdict(self.config),
        }

    # ---- data --------------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int) -> tuple[Iterable[Any], Optional[int]]:
        """Batches of `epoch` from batch `start_batch` on, and the epoch's total batch count (None if unknown)."""
        cfg = self.config
        if self.loader_factory is not None:
            it = self.loader_factory(epoch)
            total = len(it) if hasattr(it, "__len__") else None
            return islice(iter(it), start_batch, None), total
        if self.order_fn is not None:  # e.g. hard-negative partners together; a function of (seed, epoch)
            indices = shard_batches(self.order_fn(epoch), cfg.batch_size, self.dist.rank, self.dist.world_size)
        else:
            sampler = DistributedSampler(
                self.train_dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.seed
            )
            sampler.set_epoch(epoch)  # order = f(seed, epoch): torch.randperm under manual_seed(seed + epoch)
            indices = list(sampler)
        n = len(indices)
        total = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # worker seeds; never the global RNG
        loader = DataLoader(
            self.train_dataset,
            batch_size=cfg.batch_size,
            sampler=indices[start_batch * cfg.batch_size :],
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            drop_last=cfg.drop_last,
            generator=gen,
        )
        return loader, total

    # ---- one step ----------------------------------------------------------------------------------------
    def _train_step(self, batch: Any) -> torch.Tensor:
        cfg = self.config
        batch = batch.to(self.device)
        amp = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        warmup = self._epoch < cfg.sum_loss_epochs
        loss_fn = self.warmup_loss_fn if warmup else self.loss_fn
        short_w = self._shortlist_weight()
        if self._global_negatives():
            loss, logged = self._global_loss(batch, loss_fn, amp, warmup)
        else:
            with amp:
                if short_w > 0:  # (B, B) scores and shortlist cosines, one forward through DDP
                    scores, short = self.ddp(batch.images, batch.texts, warmup=warmup, return_shortlist=True)
                else:  # (B, B): DDP syncs grads
                    scores, short = self.ddp(batch.images, batch.texts, warmup=warmup), None
            loss = loss_fn(scores.float(), batch.image_ids)
            if short is not None:
                loss = loss + short_w * self.warmup_loss_fn(short.float(), batch.image_ids)
            logged = loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        return logged

    def _shortlist_weight(self) -> float:
        """The shortlist loss's weight this epoch: train.shortlist_loss_weight, for the first
        train.shortlist_loss_epochs epochs only when that is set."""
        cfg = self.config
        if cfg.shortlist_loss_epochs and self._epoch >= cfg.shortlist_loss_epochs:
            return 0.0
        return cfg.shortlist_loss_weight

    def _global_negatives(self) -> bool:
        return self.dist.enabled and self.config.global_negatives and self.task.gathers_negatives

    def _global_loss(self, batch, loss_fn, amp, warmup: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, the global batch's loss) with every rank's negatives: this rank's share of the
        global loss times the world size (DDP averages gradients, so the sum of the shares is what is followed)."""
        import torch.distributed as dist

        if not hasattr(loss_fn, "global_part"):
            raise ValueError("train.global_negatives needs a loss with global_part (tvrn.losses.ContrastiveLoss); "
                             "set train.global_negatives=false for a custom loss_fn")
        ids = batch.image_ids
        ids_all = [torch.empty_like(ids) for _ in range(self.dist.world_size)]
        dist.all_gather(ids_all, ids.contiguous())
        ids_all = torch.cat(ids_all)
        short_w = self._shortlist_weight()
        with amp:
            out = self.ddp(batch.images, batch.texts, warmup=warmup, return_shortlist=short_w > 0, gather=True)
        rows, cols, offset = out[:3]
        rows_f, extra = rows.float(), {}
        if getattr(loss_fn, "mode", None) == "published":  # its image-row term needs every caption's S[j, j]
            import torch.distributed.nn.functional as dnn

            extra["positives_all"] = torch.cat(list(dnn.all_gather(rows_f.diagonal(offset).contiguous())))  # (N,)
        part = loss_fn.global_part(rows_f, cols.float(), offset, ids, ids_all, **extra)
        if short_w > 0:
            part = part + short_w * self.warmup_loss_fn.global_part(out[3].float(), out[4].float(), offset, ids, ids_all)
        total = part.detach().clone()
        dist.all_reduce(total)
        return part * self.dist.world_size, total

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _checkpoint(self, epoch: int, batch: int, loss_sum: float, loss_batches: int) -> Optional[dict]:
        """Collective (every rank must call it): gathers RNG states and running losses; rank 0 gets the dict."""
        cfg = self.config
        per_rank = gather_objects({"rng": get_rng_state(), "loss_sum": loss_sum, "loss_batches": loss_batches})
        if not self.dist.is_main:
            return None
        return {
            "config": self._config_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "kind": "step",
                "lr": cfg.lr,
                "milestones": list(cfg.lr_milestones),
                "gamma": cfg.lr_gamma,
                "values": cfg.lr_values,
                "warmup_steps": cfg.warmup_steps,
            },
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "batch": batch,
            "step": self.step,
            "metrics": self.last_metrics,
            "best": {"rsum": self.best_rsum, "epoch": self.best_epoch, "epochs_since_best": self.epochs_since_best},
            "train": {
                "loss_sum": [p["loss_sum"] for p in per_rank],
                "loss_batches": [p["loss_batches"] for p in per_rank],
            },
            "rng": {"world_size": self.dist.world_size, "states": [p["rng"] for p in per_rank]},
            "vocab": self.vocab,
        }

    def _save(self, name: str, ckpt: Optional[dict]) -> None:
        if ckpt is not None:
            atomic_save(ckpt, self.out_dir / name)

    def _restore(self, ckpt: dict, path: Path) -> tuple[int, int, float, int]:
        check_resume(ckpt.get("config") or {}, self._config_dict(), f"cannot resume from {path}: it was trained "
                     f"with another config", "resume with the run's own settings or start a new run folder")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.last_metrics = ckpt.get("metrics")
        best = ckpt.get("best") or {}
        self.best_rsum, self.best_epoch = best.get("rsum"), best.get("epoch")
        self.epochs_since_best = int(best.get("epochs_since_best", 0))
        rng = ckpt.get("rng") or {}
        r = self.dist.rank
        loss_sum, loss_batches = 0.0, 0
        if rng.get("world_size") == self.dist.world_size:
            set_rng_state(rng["states"][r])
            loss_sum = float(ckpt["train"]["loss_sum"][r])
            loss_batches = int(ckpt["train"]["loss_batches"][r])
        return int(ckpt["epoch"]), int(ckpt["batch"]), loss_sum, loss_batches

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self, resume: bool | str | os.PathLike = False) -> dict[str, Any]:
        """Train for config.epochs (or until early stop) -> summary dict.

        resume: False (start fresh), True (continue from out_dir/last.pt if it exists, else start fresh), or a
        checkpoint path (must exist). Returns {"epochs_completed", "epochs_planned", "steps", "best_rsum",
        "best_epoch", "stopped_early", "stop_reason", "metrics", "train_loss", "last_checkpoint", "best_checkpoint",
        "resumed_from"}. stop_reason: why training ended before config.epochs (early stopping: "no dev RSUM gain
        for P epochs (train.patience=P)"), None when it ran them all. Epochs count from 0, as in metrics.jsonl.
        """
        cfg = self.config
        self._setup()
        self.step, self.last_metrics = 0, None
        self.best_rsum: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.epochs_since_best = 0
        start_epoch, start_batch, loss_sum, loss_batches = 0, 0, 0.0, 0
        resumed_from = None
        if resume:
            path = self.out_dir / "last.pt" if resume is True else Path(resume)
            if resume is not True and not path.exists():
                raise FileNotFoundError(f"no checkpoint to resume from at {path}")
            if path.exists():
                start_epoch, start_batch, loss_sum, loss_batches = self._restore(load_checkpoint(path, "cpu"), path)
                resumed_from = str(path)
                self.logger.truncate_after(self.step, start_epoch)
        if self.dist.is_main:
            write_json(self.out_dir / "config.json", self._config_dict())
        stopped_early, train_loss, completed = False, None, start_epoch
        t0 = time.time()
        try:
            for epoch in range(start_epoch, cfg.epochs):
                if cfg.patience > 0 and self.validate is not None and self.epochs_since_best >= cfg.patience:
                    stopped_early = True  # a run resumed after its early-stop epoch
                    break
                self._epoch = epoch
                loader, total = self._loader(epoch, start_batch)
                bar = self._bar(epoch, total, start_batch)
                self.ddp.train()
                batch_idx = start_batch
                for batch in loader:
                    lr = lr_at(epoch, self.step, cfg.lr, cfg.lr_milestones, cfg.lr_gamma, cfg.warmup_steps, cfg.lr_values)
                    set_lr(self.optimizer, lr)
                    loss = self._train_step(batch)
                    loss_value = float(loss)
                    loss_sum += loss_value
                    loss_batches += 1
                    self.step += 1
                    batch_idx += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                    if cfg.log_every_steps and self.step % cfg.log_every_steps == 0:
                        self.logger.log(
                            {"kind": "step", "epoch": epoch, "step": self.step, "lr": lr, "train/loss": loss_value},
                            self.step,
                        )
                    if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                        self._save("last.pt", self._checkpoint(epoch, batch_idx, loss_sum, loss_batches))
                if bar is not None:
                    bar.close()
                train_loss = self._mean_loss(loss_sum, loss_batches)
                improved = self._validate_epoch(epoch)
                loss_sum, loss_batches, start_batch = 0.0, 0, 0
                last_lr = lr_at(epoch, max(self.step - 1, 0), cfg.lr, cfg.lr_milestones, cfg.lr_gamma,
                                cfg.warmup_steps, cfg.lr_values)  # the lr of the epoch's last step
                record = {"kind": "epoch", "epoch": epoch, "step": self.step, "lr": last_lr, "train/loss": train_loss,
                          "time": time.time() - t0}
                record.update(self.last_metrics or {})
                if self.best_rsum is not None:
                    record["best/rsum"] = self.best_rsum
                self.logger.log(record, self.step)
                ckpt = self._checkpoint(epoch + 1, 0, 0.0, 0)  # logged first: a resume drops lines it redoes
                if improved:
                    self._save("best.pt", ckpt)
                self._save("last.pt", ckpt)
                completed = epoch + 1
                if cfg.patience > 0 and self.validate is not None and self.epochs_since_best >= cfg.patience:
                    stopped_early = True
                    break
        finally:
            self.logger.close()
        best = self.out_dir / "best.pt"
        stop_reason = (f"no dev RSUM gain for {self.epochs_since_best} epochs (train.patience={cfg.patience})"
                       if stopped_early else None)
        return {
            "epochs_completed": completed,
            "epochs_planned": cfg.epochs,
            "steps": self.step,
            "best_rsum": self.best_rsum,
            "best_epoch": self.best_epoch,
            "stopped_early": stopped_early,
            "stop_reason": stop_reason,
            "metrics": self.last_metrics,
            "train_loss": train_loss,
            "last_checkpoint": str(self.out_dir / "last.pt"),
            "best_checkpoint": str(best) if self.best_epoch is not None else None,
            "resumed_from": resumed_from,
        }

    def _bar(self, epoch: int, total: Optional[int], initial: int):
        if not (self.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="batch", file=sys.stderr, leave=False)

    def _mean_loss(self, loss_sum: float, loss_batches: int) -> Optional[float]:
        """Mean train loss of the epoch over all ranks."""
        parts = gather_objects((loss_sum, loss_batches))
        n = sum(p[1] for p in parts)
        return sum(p[0] for p in parts) / n if n else None

    def _validate_epoch(self, epoch: int) -> bool:
        """Run validate on rank 0, share the metrics, update best / patience. Returns whether RSUM improved."""
        if self.validate is None:
            return False
        metrics = None
        # a validate marked distributed (tvrn.pipeline.make_validate) is collective: every rank scores its share
        if self.dist.is_main or getattr(self.validate, "distributed", False):
            model = self.model
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    metrics = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                               for k, v in self.validate(model).items()}
            finally:
                model.train(was_training)
            if "rsum" not in metrics:
                raise KeyError("validate(model) must return a dict with an 'rsum' entry")
        metrics = broadcast_object(metrics)
        self.last_metrics = metrics
        rsum = float(metrics["rsum"])
        if self.best_rsum is None or rsum > self.best_rsum:
            self.best_rsum, self.best_epoch, self.epochs_since_best = rsum, epoch, 0
            return True
        self.epochs_since_best += 1
        return False
