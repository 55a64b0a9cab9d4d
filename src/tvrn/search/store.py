"""Encodings on disk: one `.npy` file per field, read by row with pread and written by row with pwrite.

A search index over a large gallery keeps its per-image and per-caption encodings here instead of in RAM: a
query reads the rows of its shortlisted candidates only. Rows are read and written with positional reads and
writes at the row's offset (`NpyRows`, `NpyRowWriter`: os.preadv / os.pwrite), not through a memory map, so
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

from ..fileio import NpyRows, sha256_file  # noqa: F401  (NpyRows: the row reader; sha256_file also imported from here)

STORAGE = ("float32", "float16", "bfloat16")


def _close_fd(self) -> None:
    """__del__ of StringRows: close the file it reads with pread."""
    fd = getattr(self, "fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class NpyRowWriter:
    """A preallocated `.npy` file of `shape`, filled by rows with pwrite (no memory map: a streaming build's
    resident memory is the batch it writes, whatever the file's size). Rows never written read as zeros."""

    def __init__(self, path: str | os.PathLike, shape: tuple, dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        with open(self.path, "wb") as f:  # header, then the data area sized (sparse) to the whole array
            np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": self.shape})
            self.offset = f.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        os.truncate(self.path, self.offset + self.shape[0] * self.row_bytes)
        self.fd = os.open(self.path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        """rows (B, *shape[1:]) of `dtype` -> file rows start .. start + B."""
        if rows.shape[1:] != self.shape[1:] or rows.dtype != self.dtype:
            raise ValueError(f"{self.path}: rows {rows.dtype} {rows.shape[1:]} do not fit {self.dtype} {self.shape[1:]}")
        if start < 0 or start + rows.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: rows {start}..{start + rows.shape[0]} outside 0..{self.shape[0]}")
        view = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
        pos = self.offset + start * self.row_bytes
        while len(view):
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None

    def abort(self) -> None:
        """Close without flushing (a failed build, whose files are removed)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class StringRows:
    """N strings kept on disk: a UTF-8 text file with one string per line, and the (N + 1,) int64 byte offsets of
    the lines in an `.npy` beside it (`write_strings`). A string is read by pread when asked, so a gallery's ids
    and captions take no memory however many there are. Sequence-like: len, [i], [a:b] (a list), iteration,
    index(value)."""

    def __init__(self, txt: str | os.PathLike, offsets: str | os.PathLike):
        self.path = Path(txt)
        self.offsets = NpyRows(offsets)
        self.n = len(self.offsets) - 1
        self.fd = os.open(self.path, os.O_RDONLY)
        need, have = (int(self.offsets[self.n]) if self.n >= 0 else 0), os.fstat(self.fd).st_size
        if self.n < 0 or have < need:  # a truncated file: refused on opening, not by the query that reaches its end
            os.close(self.fd)
            self.fd = None
            raise ValueError(f"{self.path}: truncated ({have} bytes, its offsets need {need})" if self.n >= 0
                             else f"{offsets}: no offsets")

    __del__ = _close_fd

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(self.n))]
        i = int(key) + self.n if key < 0 else int(key)
        if not 0 <= i < self.n:
            raise IndexError(f"string {key} out of range for {self.n} strings of {self.path}")
        a, b = (int(x) for x in self.offsets[i : i + 2])
        data = os.pread(self.fd, b - a, a)
        if len(data) != b - a:
            raise ValueError(f"{self.path}: truncated at string {i} (bytes {a}..{b})")
        return data[:-1].decode("utf-8")  # without its newline

    def __iter__(self):
        with open(self.path, "rb") as f:  # binary: split on b"\n" only, as written
            for _, line in zip(range(self.n), f):
                yield line[:-1].decode("utf-8")

    def index(self, value: str) -> int:
        for i, v in enumerate(self):
            if v == value:
                return i
        raise ValueError(f"{value!r} is not in {self.path}")


def write_strings(txt: str | os.PathLike, offsets: str | os.PathLike, strings) -> int:
    """Write `strings` one per line to `txt` (UTF-8) and their byte offsets to `offsets` -> the count. A string
    with a newline is refused: the text file stays one string per line for any other reader."""
    pos, offs = 0, [0]
    with open(txt, "wb") as f:
        for i, s in enumerate(strings):
            if "\n" in s:
                raise ValueError(f"{txt}: string {i} contains a newline: {s[:60]!r}")
            data = s.encode("utf-8") + b"\n"
            f.write(data)
            pos += len(data)
            offs.append(pos)
    np.save(offsets, np.asarray(offs, dtype=np.int64))
    return len(offs) - 1


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
