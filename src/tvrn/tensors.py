"""The one container base for dataclasses of tensors that share an item axis: batches (`tvrn.data.batch`) and
encodings (`tvrn.models.base`).

Every tensor field has the items on axis 0 (B images, Nt captions, ...); fields that are None (not computed) or
not tensors (ints, strings) ride along unchanged. Indexing, moving, mapping and concatenating act on every tensor
field together, so `images[i0:i1].adjacency` can never come from another block than `images[i0:i1].features`.

    class MyBatch(TensorFields):   # a @dataclass
        features: torch.Tensor        # (B, R, D)
        mask: torch.Tensor            # (B, R)

    b[2:5], b[i], b.to("cuda"), b.map(torch.Tensor.contiguous), MyBatch.cat([b1, b2])
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T", bound="TensorFields")


class TensorFields:
    """Base of tensor dataclasses with a shared leading item axis (see the module doc)."""

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """{name: tensor} of the fields that hold a tensor, in field order."""
        return tensor_fields(self)

    def map(self: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
        """A copy with fn applied to every tensor field (None and non-tensor fields kept)."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensor_fields().items()})

    def __len__(self) -> int:
        for f in dataclasses.fields(self):  # the first tensor field's item count
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                return v.shape[0]
        raise TypeError(f"{type(self).__name__} holds no tensor")

    def __getitem__(self: T, idx) -> T:
        """Items `idx` of every tensor field (an int keeps the item axis: b[3] has length 1)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return self.map(lambda t: t[idx])

    def to(self: T, device=None, dtype=None) -> T:
        """Every tensor field to `device`; floating fields also to `dtype` (masks and indices keep theirs)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def contiguous(self: T) -> T:
        """Every tensor field contiguous (fields that already are stay shared)."""
        return self.map(torch.Tensor.contiguous)

    @classmethod
    def cat(cls: type[T], items: Sequence[T]) -> T:
        """Concatenate along the item axis: see `cat_fields`."""
        return cat_fields(items)


def tensor_fields(obj) -> dict[str, torch.Tensor]:
    """{name: tensor} of a dataclass's fields that hold a tensor, in field order (any dataclass)."""
    return {f.name: v for f in dataclasses.fields(obj) if isinstance(v := getattr(obj, f.name), torch.Tensor)}


def pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad (False for bool) every axis after the first up to `shape` (the item axis kept)."""
    if tuple(t.shape[1:]) == tuple(shape[1:]):
        return t
    out = t.new_zeros((t.shape[0], *shape[1:]))
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def cat_tensors(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n_k, ...) tensors -> (sum n_k, ...): every axis after the first padded to the longest (zeros / False)."""
    dims = {t.dim() for t in ts}
    if len(dims) != 1:
        raise ValueError(f"cannot concatenate tensors of different ranks {sorted(dims)}")
    if ts[0].dim() == 0:
        raise ValueError("tensor fields must have an item axis first, got a 0-d tensor")
    shape = [max(t.shape[d] for t in ts) for d in range(ts[0].dim())]
    return torch.cat([pad_to(t, shape) for t in ts], 0)


def cat_fields(items: Sequence):
    """Concatenate tensor dataclasses (or plain tensors) along the item axis (dim 0).

    Tensor fields are padded on every later axis to the longest (zeros; False for bool masks: token and region
    counts differ between batches) and concatenated; None fields stay None (all must be None); other fields must
    be equal and are kept. Padded positions hold zeros: models ignore them through their masks."""
    items = list(items)
    if not items:
        raise ValueError("nothing to concatenate")
    first = items[0]
    if len(items) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return cat_tensors(items)
    if not dataclasses.is_dataclass(first):
        raise TypeError(f"cat_fields expects tensors or tensor dataclasses, got {type(first).__name__}")
    changes = {}
    for f in dataclasses.fields(first):
        vals = [getattr(x, f.name) for x in items]
        if all(v is None for v in vals):
            continue
        if any(v is None for v in vals):
            raise ValueError(f"field {f.name!r} is None in some items and not in others")
        if isinstance(vals[0], torch.Tensor):
            changes[f.name] = cat_tensors(vals)
        elif any(v != vals[0] for v in vals[1:]):
            raise ValueError(f"non-tensor field {f.name!r} differs between items")
    return dataclasses.replace(first, **changes)
