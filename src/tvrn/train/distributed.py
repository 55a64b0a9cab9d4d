"""Distributed helpers: torchrun / torch.distributed.run environment, DDP, rank-0 duties.

Under `torchrun --nproc_per_node=N ...` the environment carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_distributed()` initialises the default process group from them (NCCL when CUDA is
available, gloo otherwise). Without them everything runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size of this process and its local_rank on the node (the GPU it uses)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process's place, from the initialised process group (or rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(backend: Optional[str] = None) -> DistInfo:
    """Initialise the default process group from torchrun's env vars when present (and WORLD_SIZE > 1).

    backend: "nccl" on CUDA, "gloo" on CPU by default. Sets the CUDA device to LOCAL_RANK. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return dist_info()


def cleanup_distributed() -> None:
    """Leave the process group together: a barrier first, so no rank tears down its gloo / NCCL connections
    while another is still finishing its last collective or checkpoint (a rank leaving early aborted with
    'terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # free DDP reducers and their pending gloo work while the interpreter is fully alive
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
