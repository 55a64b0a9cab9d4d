"""Run logs: a JSON-lines metrics file, and TensorBoard scalars when tensorboard is importable.

One record per line, e.g. {"kind": "epoch", "epoch": 3, "step": 1200, "lr": 2e-4, "train/loss": 12.3,
"i2t/R@1": ..., "rsum": ...}. Only rank 0 writes. The library never prints.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunLogger:
    """Appends records to `out_dir/metrics.jsonl`; mirrors numeric fields to TensorBoard when available."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def truncate_after(self, step: int, epoch: int) -> None:
        """Drop what a killed run wrote after its last checkpoint (at `step`, continuing in `epoch`): records
        with a larger step, and epoch records of epochs >= `epoch` (the resumed run redoes them)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= step and not (rec.get("kind") == "epoch" and rec.get("epoch", -1) >= epoch):
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, record: dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
