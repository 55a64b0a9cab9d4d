"""Learning-rate schedule: step decay by epoch with optional linear warmup by step.

The schedule is a pure function of (epoch, global step), so resuming needs no scheduler state beyond the
position: lr(epoch, step) = base(epoch) * min(1, (step + 1) / warmup_steps), where base(epoch) is
`lr_values[k]` when explicit values are given, else lr * gamma ** k, k = number of milestones <= epoch.
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import torch


def lr_at(
    epoch: int,
    step: int,
    lr: float,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_steps: int = 0,
    lr_values: Optional[Sequence[float]] = None,
) -> float:
    """Learning rate for the optimiser step `step` (0-based, global) taken in epoch `epoch` (0-based)."""
    ms = sorted(milestones)
    k = bisect.bisect_right(ms, epoch)  # milestones already passed
    if lr_values is not None:
        if len(lr_values) != len(ms) + 1:
            raise ValueError(f"lr_values needs {len(ms) + 1} entries for {len(ms)} milestones, got {len(lr_values)}")
        base = float(lr_values[k])
    else:
        base = lr * gamma**k
    if warmup_steps > 0:
        base *= min(1.0, (step + 1) / warmup_steps)
    return base


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
