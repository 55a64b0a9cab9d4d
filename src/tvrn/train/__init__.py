"""Training: the loop, its configuration, the lr schedule, checkpoints and distributed helpers.

The library (`tvrn.models`, `tvrn.scoring`, `tvrn.metrics`, `tvrn.evaluation`) imports without this package.
"""
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_model_from_checkpoint
from .distributed import DistInfo, cleanup_distributed, dist_info, init_distributed
from .schedule import lr_at
from .trainer import Trainer, TrainConfig, configure_determinism, seed_everything

__all__ = [
    "Trainer",
    "TrainConfig",
    "seed_everything",
    "configure_determinism",
    "lr_at",
    "atomic_save",
    "load_checkpoint",
    "CheckpointError",
    "load_model_from_checkpoint",
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "dist_info",
]
