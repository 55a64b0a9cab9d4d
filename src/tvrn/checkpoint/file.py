"""Checkpoint files: plain data, written atomically, loadable with torch.load(weights_only=True).

Layout of a checkpoint dict:
    config:    {"model_name": str | None, "model": dict (asdict(model.config)) | None, "train": dict}
    model:     state_dict of the unwrapped model
    optimizer: optimizer state_dict
    scheduler: {"kind": "step", ...} the schedule's settings (the lr is a function of epoch and step)
    scaler:    GradScaler state_dict (fp16 on CUDA) or None
    epoch:     the epoch to continue in (0-based)
    batch:     batches of that epoch already done (0 at an epoch boundary)
    step:      optimiser steps done in total
    metrics:   the last validation metrics, or None
    best:      {"rsum": float | None, "epoch": int | None, "epochs_since_best": int}
    train:     {"loss_sum": float, "loss_batches": int} running train loss of the current epoch
    rng:       {"world_size": int, "states": [per-rank RNG states]}: torch / CUDA / numpy / python, as tensors
    vocab:     optional dict
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..fileio import atomic_write, load_torch_file



def state_digest(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and tensor bytes (sorted by name)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes (bf16, bool, 0-dim included)
    return h.hexdigest()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through tvrn.fileio.atomic_write: a reader (or a resume after a kill) sees the old file or
    the new one, never half of one. A dict with a "model" state dict also gets "model_sha256", which
    `load_checkpoint` checks (a flipped bit in the weights is refused, not used)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = {**obj, "model_sha256": state_digest(obj["model"])}
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(path: str | os.PathLike, model_name: str, model, vocab=None) -> None:
    """A checkpoint of weights only (no optimiser or schedule), which `tvrn eval`, `tvrn index` and
    `tvrn.checkpoint.load_trained` read like a trained one: a model built elsewhere, converted or untrained
    (tests, benchmarks). vocab: a tvrn.data.Vocabulary for GRU text encoders."""
    from dataclasses import asdict

    obj = {"config": {"model_name": model_name, "model": asdict(model.config)}, "model": model.state_dict()}
    if vocab is not None:
        obj["vocab"] = vocab.to_json_dict()
    atomic_save(obj, path)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong with it."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """torch.load(path, weights_only=True): plain tensors, dicts, lists and numbers only. A checkpoint written
    with a "model_sha256" is refused when its weights no longer match it. A file that is empty, truncated, damaged,
    no checkpoint at all or holds anything else raises `CheckpointError` (a ValueError) saying so; a missing one
    FileNotFoundError."""

    obj = load_torch_file(path, CheckpointError, "tensors, dicts, lists, numbers and strings",
                        map_location=map_location)
    if isinstance(obj, dict) and obj.get("model_sha256") and isinstance(obj.get("model"), dict):
        if state_digest(obj["model"]) != obj["model_sha256"]:
            raise CheckpointError(f"{path}: the model weights are corrupted (their sha256 differs from the one "
                                  f"saved with them)")
    return obj
