"""Training: the loop (`Trainer`), its training task (what a step scores), the lr schedule and the RNG state a
resume restores. Checkpoint files are `tvrn.checkpoint`; torch.distributed helpers are `tvrn.distributed`.

The library (`tvrn.models`, `tvrn.scoring`, `tvrn.metrics`, `tvrn.evaluation`) imports without this package.
"""
from .schedule import lr_at
from .trainer import Trainer, TrainConfig, configure_determinism, seed_everything

__all__ = ["Trainer", "TrainConfig", "seed_everything", "configure_determinism", "lr_at"]
