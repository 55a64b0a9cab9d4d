"""Encodings on disk: one `.npy` file per field, memory-mapped and read by row, written by streaming.

A search index over a large gallery keeps its per-image and per-caption encodings here instead of in RAM: a
query reads the rows of its shortlisted candidates only (the operating system pages in what is touched). Fields
are stored as float32, float16 or bfloat16 (numpy has no bfloat16: its 16 bits are stored as uint16 and
reinterpreted on reading); masks as bool. Every file's sha256 goes into the index manifest and is checked when
the index is opened, so a corrupted file is refused by name.

    writer = FieldWriter(folder / "images", n=N, dtype="float16")
    for start, enc in batches: writer.write(start, enc)          # EncodedImages of rows start.. start + len(enc)
    meta = writer.close()                                         # {field: {"file", "shape", "dtype", "stored"}}
    rows = FieldStore(folder / "images", meta, EncodedImages)
    enc = rows.get(torch.tensor([5, 17, 3]))                      # EncodedImages of those 3 rows (float32)
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STORAGE = ("float32", "float16", "bfloat16")


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """Streaming sha256 of a file (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return t.numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.uint16).numpy()
    return t.to(getattr(torch, dtype)).numpy()


def _from_storage(a: np.ndarray, stored: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a copy: rows read from the (read-only) memory map
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
        self.arrays: dict[str, np.memmap] = {}
        self.meta: dict[str, dict] = {}
        self.absent: set[str] = set()

    def _open(self, name: str, t: torch.Tensor) -> np.memmap:
        shape = (self.n, *self.max_shape.get(name, tuple(t.shape[1:])))
        stored = "bool" if t.dtype == torch.bool else self.dtype
        np_dtype = {"bool": np.bool_, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[stored]
        file = f"{name}.npy"
        arr = np.lib.format.open_memmap(self.folder / file, mode="w+", dtype=np_dtype, shape=shape)
        self.meta[name] = {"file": file, "shape": list(shape), "stored": stored}
        return arr

    def write(self, start: int, enc: Any) -> None:
        for f in dataclasses.fields(enc):
            t = getattr(enc, f.name)
            if not isinstance(t, torch.Tensor):
                self.absent.add(f.name)
                continue
            if f.name not in self.arrays:
                self.arrays[f.name] = self._open(f.name, t)
            arr = self.arrays[f.name]
            a = _to_storage(t, self.meta[f.name]["stored"])
            if a.shape[1:] != arr.shape[1:]:  # a shorter word axis: pad
                if any(x > y for x, y in zip(a.shape[1:], arr.shape[1:])):
                    raise ValueError(f"field {f.name}: rows {a.shape[1:]} exceed the allocated {arr.shape[1:]}")
                arr[start:start + a.shape[0]] = 0
                arr[(slice(start, start + a.shape[0]), *(slice(0, k) for k in a.shape[1:]))] = a
            else:
                arr[start:start + a.shape[0]] = a

    def close(self) -> dict[str, dict]:
        """Flush the files -> their metadata (with sha256 of each file)."""
        for name, arr in self.arrays.items():
            arr.flush()
            del arr
        self.arrays.clear()
        for name, m in self.meta.items():
            m["sha256"] = sha256_file(self.folder / m["file"])
        return dict(self.meta)


class FieldStore:
    """Read rows of a FieldWriter's files: get(idx (K,) long) -> an encoded dataclass of those K rows."""

    def __init__(self, folder: str | os.PathLike, meta: dict[str, dict], cls):
        self.folder, self.meta, self.cls = Path(folder), meta, cls
        self.arrays = {name: np.load(self.folder / m["file"], mmap_mode="r") for name, m in meta.items()}
        self.n = next(iter(self.arrays.values())).shape[0] if self.arrays else 0

    def __len__(self) -> int:
        return self.n

    def get(self, idx) -> Any:
        idx = np.asarray(torch.as_tensor(idx).long().cpu())
        order = np.argsort(idx, kind="stable")  # read pages in file order, give rows in the asked order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        fields = {}
        for name, arr in self.arrays.items():
            rows = arr[idx[order]][inverse]
            fields[name] = _from_storage(rows, self.meta[name]["stored"])
        return self.cls(**fields)

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
