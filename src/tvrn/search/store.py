"""Encodings on disk: one `.npy` file per field, read by row with pread and written by row with pwrite.

A search index over a large gallery keeps its per-image and per-caption encodings here instead of in RAM: a
query reads the rows of its shortlisted candidates only. Rows are read and written with positional reads and
writes at the row's offset (`tvrn.fileio.NpyRows`, `NpyRowWriter`: os.preadv / os.pwrite), not through a memory map, so
neither a build nor a long-running server accumulates mapped file pages in its resident memory: a process holds
the rows it is working on and nothing else (the kernel's page cache still speeds up repeated reads, outside the
process). A gallery's ids and captions are kept the same way (`StringRows`: a text file and its line offsets,
read by pread). Fields are stored as float32, float16 or bfloat16 (numpy has no bfloat16: its 16 bits are
stored as uint16 and reinterpreted on reading); masks as bool. Every file's sha256 goes into the index manifest
and is checked when the index is opened, so a corrupted file is refused by name.

    writer = FieldWriter(folder / "images", n=N, dtype="float16")
    for start, enc in batches: writer.write(start, enc)          # EncodedImages of rows start.. start + len(enc)
    meta = writer.close()                                         # {field: {"file", "shape", "dtype", "stored"}}
    rows = FieldStore(folder / "images", meta, EncodedImages)
    enc = rows.get(torch.tensor([5, 17, 3]))                      # EncodedImages of those 3 rows (float32)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..fileio import NpyRows, NpyRowWriter, sha256_file  # noqa: F401  (sha256_file: also imported from here)
from ..tensors import tensor_fields

STORAGE = ("float32", "float16", "bfloat16")


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.uint16).numpy()
    return t.to(getattr(torch, dtype)).numpy()


def _from_storage(a: np.ndarray, stored: str) -> torch.Tensor:
    t = torch.from_numpy(np.require(a, requirements=["C", "W"]))  # NpyRows gives fresh, writable rows: no copy
    if stored == "bool":
        return t
    if stored == "bfloat16":
        return t.view(torch.bfloat16).float()
    return t.float()


class FieldWriter:
    """Preallocated `.npy` files for the fields of N encoded items, filled in order of rows (see module doc).

    max_shape: {field: shape after the item axis} for fields whose later axes vary between batches (captions'
    word axis): they are allocated at that size and zero-padded (False for masks)."""

    def __init__(self, folder: str | os.PathLike, n: int, dtype: str = "float32",
                 max_shape: Optional[dict[str, tuple]] = None):
        if dtype not in STORAGE:
            raise ValueError(f"storage dtype must be one of {STORAGE}, got {dtype!r}")
        self.folder, self.n, self.dtype = Path(folder), n, dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shape = max_shape or {}
        self.arrays: dict[str, NpyRowWriter] = {}
        self.meta: dict[str, dict] = {}
        self.absent: set[str] = set()

    def _open(self, name: str, t: torch.Tensor) -> NpyRowWriter:
        shape = (self.n, *self.max_shape.get(name, tuple(t.shape[1:])))
        stored = "bool" if t.dtype == torch.bool else self.dtype
        np_dtype = {"bool": np.bool_, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[stored]
        file = f"{name}.npy"
        self.meta[name] = {"file": file, "shape": list(shape), "stored": stored}
        return NpyRowWriter(self.folder / file, shape, np_dtype)

    def write(self, start: int, enc: Any) -> None:
        present = tensor_fields(enc)
        self.absent.update(f.name for f in dataclasses.fields(enc) if f.name not in present)
        for name, t in present.items():
            if name not in self.arrays:
                self.arrays[name] = self._open(name, t)
            arr = self.arrays[name]
            a = _to_storage(t, self.meta[name]["stored"])
            if a.shape[1:] != arr.shape[1:]:  # a shorter word axis: pad
                if any(x > y for x, y in zip(a.shape[1:], arr.shape[1:])):
                    raise ValueError(f"field {name}: rows {a.shape[1:]} exceed the allocated {arr.shape[1:]}")
                padded = np.zeros((a.shape[0], *arr.shape[1:]), a.dtype)
                padded[(slice(None), *(slice(0, k) for k in a.shape[1:]))] = a
                a = padded
            arr.write(start, a)

    def abort(self) -> None:
        """Close the files without flushing them (a failed build, whose folder is removed)."""
        for arr in self.arrays.values():
            arr.abort()
        self.arrays.clear()

    def close(self) -> dict[str, dict]:
        """Flush the files -> their metadata (with sha256 of each file)."""
        for arr in self.arrays.values():
            arr.close()
        self.arrays.clear()
        for name, m in self.meta.items():
            m["sha256"] = sha256_file(self.folder / m["file"])
        return dict(self.meta)


class FieldStore:
    """Read rows of a FieldWriter's files: get(idx (K,) long) -> an encoded dataclass of those K rows."""

    def __init__(self, folder: str | os.PathLike, meta: dict[str, dict], cls):
        self.folder, self.meta, self.cls = Path(folder), meta, cls
        self.arrays = {name: NpyRows(self.folder / m["file"]) for name, m in meta.items()}
        self.n = next(iter(self.arrays.values())).shape[0] if self.arrays else 0

    def __len__(self) -> int:
        return self.n

    def get(self, idx) -> Any:
        idx = np.asarray(torch.as_tensor(idx).long().cpu())
        return self.cls(**{name: _from_storage(arr[idx], self.meta[name]["stored"])  # NpyRows: file order reads
                           for name, arr in self.arrays.items()})

    def slice(self, start: int, stop: int) -> Any:
        return self.cls(**{name: _from_storage(arr[start:stop], self.meta[name]["stored"])
                           for name, arr in self.arrays.items()})

    def verify(self, label: str) -> None:
        """Raise ValueError naming the first file whose sha256 differs from the manifest."""
        for name, m in self.meta.items():
            got = sha256_file(self.folder / m["file"])
            if got != m.get("sha256"):
                raise ValueError(f"{label}: {self.folder / m['file']} is corrupted (sha256 {got[:16]}..., the index "
                                 f"recorded {str(m.get('sha256'))[:16]}...)")
