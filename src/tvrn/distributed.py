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


def gather_encoded(enc):
    """Every rank's encodings concatenated in rank order, with autograd (the gradient of a gathered slice flows
    back to the rank that owns it): (gathered encodings, this rank's offset in them). Tensor fields are padded on
    every axis after the first to the largest size of any rank (zeros; False for masks: batches are padded to their
    own longest caption). Identity (offset 0) when not distributed."""
    import dataclasses

    import torch.distributed.nn.functional as dnn

    from .tensors import pad_to, tensor_fields

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return enc, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    names = list(tensor_fields(enc))
    first = getattr(enc, names[0])
    sizes = torch.zeros(world, len(names), 4, dtype=torch.long, device=first.device)
    for j, n in enumerate(names):  # every field's shape on every rank (at most 4 axes)
        shape = getattr(enc, n).shape
        sizes[rank, j, :len(shape)] = torch.tensor(shape, device=first.device)
    dist.all_reduce(sizes)  # rows of other ranks are zero here: the sum is everyone's shapes
    offset = int(sizes[:rank, 0, 0].sum())
    if len(set(sizes[:, 0, 0].tolist())) != 1:
        raise ValueError(f"global negatives need the same batch size on every rank, got {sizes[:, 0, 0].tolist()}")
    out = {}
    for j, n in enumerate(names):
        t = getattr(enc, n)
        full = [int(x) for x in sizes[:, j].amax(0)[: t.dim()]]
        t = pad_to(t, full)  # later axes to every rank's largest
        if t.is_floating_point():
            parts = dnn.all_gather(t)  # autograd: backward sums the gradients into the owner's slice
        else:  # masks: no gradient; bool travels as uint8 (not every backend has bool)
            u = t.to(torch.uint8) if t.dtype == torch.bool else t
            parts = [torch.empty_like(u) for _ in range(world)]
            dist.all_gather(parts, u.contiguous())
            parts = [x.bool() for x in parts] if t.dtype == torch.bool else parts
        out[n] = torch.cat(list(parts), 0)
    return dataclasses.replace(enc, **out), offset


def all_reduce_sum_(t: torch.Tensor, slab_mb: float = 64.0) -> torch.Tensor:
    """Sum `t` over the ranks in place, on every rank (identity when not distributed); -> t.

    Used to assemble shards that are zero outside their own entries, where the sum is exact (x + 0 = x). NCCL
    reduces only CUDA tensors: a CPU tensor then travels through the current CUDA device in slabs of `slab_mb`,
    so the extra device memory is one slab, not the matrix."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    flat = t.view(-1)
    if dist.get_backend() != "nccl" or t.is_cuda:
        dist.all_reduce(flat)
        return t
    step = max(1, int(slab_mb * 2**20) // t.element_size())
    for a in range(0, flat.numel(), step):
        slab = flat[a : a + step].cuda()
        dist.all_reduce(slab)
        flat[a : a + step].copy_(slab)
    return t
