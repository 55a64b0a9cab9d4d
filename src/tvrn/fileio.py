"""The one I/O module. Files that matter: atomic writes (a temporary file in the destination folder, fsync, then
os.replace, so a reader, or a run resumed after a kill, sees the old file or the new one, never half of one) of
bytes, text and JSON; sha256 of files; temporaries of killed writers; `.npy` rows and strings read and written by
position (pread / pwrite, no memory map: `NpyRows`, `NpyRowWriter`, `StringRows`, `write_strings`); and checked
loading of torch files (what is wrong with a file that is empty, truncated, damaged or no checkpoint at all, by its path,
before torch's own message and advice can reach a user)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Call write(f) on a binary temp file next to `path`, then rename it into place with permissions `mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class NpyRows:
    """Rows of a C-ordered `.npy` file, read on demand with positional reads (pread): no memory map, so a process
    holds the rows it asked for and nothing else (the kernel's page cache still speeds up repeated reads).
    Thread-safe, and fork-safe (a forked worker reopens the file; pickling drops the descriptor).

        rows = NpyRows("test_ims.npy")          # (N, *row_shape), the header only is read here
        rows[a:b], rows[i], rows[idx]           # idx: (n,) int, any order, repeats allowed -> (n, *row_shape)

    A file that is not a `.npy` array, truncated, Fortran-ordered or 0-d is refused on opening with
    `error(path, problem)` (default: ValueError "PATH: PROBLEM"): the data layer passes its FeatureFileError."""

    def __init__(self, path: str | os.PathLike, error: Optional[Callable[[str, str], Exception]] = None):
        self.path = str(path)
        self._error = error or _path_error
        try:  # the header only
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"unsupported .npy format version {version}")
                shape, fortran, dtype = read(f)
                self.offset: int = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (ValueError, OSError, EOFError) as e:  # not a .npy file, unreadable
            raise self._error(self.path, f"cannot open as a .npy array ({e})") from None
        if fortran or len(shape) < 1:
            raise self._error(self.path, "expected a C-ordered array with at least one axis")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        need = self.offset + self.shape[0] * self.row_bytes
        if size < need:  # refused on opening, not by the first read that reaches the missing bytes
            raise self._error(self.path, f"cannot open as a .npy array (truncated: {size} bytes, the header needs "
                                         f"{need})")
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # reopen in a forked worker: no shared state
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _read_into(self, buf: np.ndarray, first_row: int) -> None:
        """Fill buf (a C-contiguous block of whole rows) from the file starting at first_row."""
        view = memoryview(buf.reshape(-1).view(np.uint8))
        pos, done = self.offset + first_row * self.row_bytes, 0
        fd = self._file()
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise self._error(self.path, f"file is truncated (rows from {first_row} are missing)")
            done += n

    def rows(self, file_rows) -> np.ndarray:
        """file_rows (n,) int -> (n, *row_shape) array, in the order given (repeats allowed; negative indices
        are not)."""
        file_rows = np.asarray(file_rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(file_rows),) + self.row_shape, dtype=self.dtype)
        if len(file_rows) == 0:
            return out
        if file_rows.min() < 0 or file_rows.max() >= len(self):
            raise IndexError(f"rows out of range 0..{len(self) - 1} in {self.path}")
        order = np.argsort(file_rows, kind="stable")
        sorted_rows = file_rows[order]
        if np.array_equal(order, np.arange(len(order))) and np.all(np.diff(sorted_rows) == 1):
            self._read_into(out, int(sorted_rows[0]))  # the common case: one contiguous run, read in place
            return out
        # group the sorted rows into contiguous runs (repeats are read once), one read per run
        unique_rows, inverse = np.unique(sorted_rows, return_inverse=True)
        block = np.empty((len(unique_rows),) + self.row_shape, dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(unique_rows) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(unique_rows)]):
            self._read_into(block[start:stop], int(unique_rows[start]))
        out[order] = block[inverse.reshape(-1)]
        return out

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("NpyRows: slices with a step are not supported")
            out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
            if len(out):
                self._read_into(out, start)
            return out
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows of {self.path}")
            return self[i : i + 1][0]
        idx = np.asarray(key)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"NpyRows: index with a slice, an int or a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"rows out of range for {n} rows of {self.path}")
        return self.rows(idx)

    def __array__(self, dtype=None, copy=None):
        whole = self[0 : self.shape[0]]
        return whole if dtype is None else whole.astype(dtype)


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


def _path_error(path: str, problem: str) -> Exception:
    return ValueError(f"{path}: {problem}")


def error_reason(e: BaseException) -> str:
    """One line for an error inside a message about a file: its type and first line, bounded (never an object
    repr); a KeyError says which entry is missing."""
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r} entry" if e.args else "a missing entry"
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text written atomically (`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> None:
    """A JSON document (UTF-8, one trailing newline) written atomically. dumps_kwargs: json.dumps options
    (default indent=2)."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip archive (torch.load tells them apart by this)
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle stream (PROTO opcode, protocol >= 2), torch's magic number first
_HEAD = 64


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """Streaming sha256 of a file (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# folder outputs (an index, an exported model) are written in a temporary folder beside them, renamed into place
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:64] or "host"


def temporary_sibling(out: str | os.PathLike, pid: int | None = None) -> Path:
    """The temporary folder a writer of `out` uses: .NAME.tmp.PID@HOST beside it (pid: this process's)."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp.{os.getpid() if pid is None else pid}@{HOST}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process of another user counts: not ours to judge)."""
    if pid <= 0:
        return True  # os.kill(0, ...) would mean the process group: never treated as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True
    return True


def stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Temporary folders of earlier writers of `out` that are gone: .NAME.tmp.PID@HOST of this host whose process
    no longer exists (a killed `tvrn index` or `tvrn export`), and .NAME.tmp of tvrn versions that had no pid in
    the name (then one writer per output at a time). A live writer's folder, another host's, and other names are
    kept."""
    out = Path(out)
    legacy = f".{out.name}.tmp"
    named = re.compile(re.escape(legacy) + r"\.([0-9]{1,9})@([A-Za-z0-9_-]+)")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    stale = []
    for p in entries:
        m = named.fullmatch(p.name)
        if p.name == legacy or (m and m.group(2) == HOST and int(m.group(1)) != os.getpid()
                                and not process_alive(int(m.group(1)))):
            stale.append(p)
    return sorted(stale)


def _first_bytes(head: bytes) -> str:
    """The start of a file that is no checkpoint, shown safely: as text if it reads as text, else in hex."""
    text = head.decode("utf-8", errors="replace")
    if len(head) == _HEAD:
        text = text.rstrip("\ufffd")  # a character cut at the end of what was read
    shown = text[:24]
    if shown and "\ufffd" not in shown and all(c.isprintable() or c in "\t\r\n" for c in shown):
        return f"it starts with {shown + ('...' if len(text) > 24 else '')!r}, a text file?"
    return f"it starts with the bytes {head[:12].hex(' ')}{' ...' if len(head) > 12 else ''}"


def _check_zip(path, error) -> None:
    """A torch zip checkpoint: its central directory complete, every entry's header where the directory says, and
    data.pkl intact (CRC-32; torch checks none). The tensor bytes are left to torch (tvrn's checkpoints: sha256)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                for info in infos:
                    f.seek(info.header_offset)
                    if info.header_offset + info.compress_size > size or f.read(4) != _ZIP_MAGIC:
                        raise zipfile.BadZipFile(f"the entry {info.filename!r} is cut off or its header damaged")
            pkl = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if not pkl:
                raise error(f"{path} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)")
            try:
                z.read(pkl[0])
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise error(f"{path} is damaged (its pickle cannot be read: {e})") from None
    except zipfile.BadZipFile as e:
        why = "its central directory (the index at the end) is missing" if "not a zip file" in str(e) else str(e)
        raise error(f"{path} is truncated or damaged (not a complete zip archive: {why})") from None


def _check_checkpoint_file(path, error) -> str:
    """What is wrong with the file at `path`, before torch.load reads it: raises error(message naming the path) for a
    file that cannot be read, is empty, is neither a zip archive nor a pickle stream, or is a truncated or damaged
    zip archive. Returns "zip" or "pickle" (the legacy format). A missing file raises FileNotFoundError."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{path} cannot be read ({type(e).__name__}: {e.strerror or e})") from None
    if not head:
        raise error(f"{path} is empty (0 bytes)")
    if head.startswith(_ZIP_MAGIC):
        _check_zip(path, error)
        return "zip"
    if head.startswith(_PICKLE_MAGIC):
        return "pickle"
    raise error(f"{path} is not a PyTorch checkpoint ({_first_bytes(head)})")


def _torch_detail(e: BaseException) -> str:
    """torch's message, less its advice (weights_only=False, allow-listing, links): the line that says what failed."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    detail = " ".join(lines)[:300]
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _load_failure(path, e: BaseException, allowed: str) -> str:
    """torch.load's exception -> what is wrong with the file, naming it."""
    import pickle
    import re
    import struct

    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)  # torch's words for a global it refused
    if found:
        return f"{path} holds a `{found.group(1)}`, which is not allowed (only {allowed} are accepted): not loaded"
    if isinstance(e, EOFError):
        return f"{path} is truncated or damaged (its pickle stream ends early)"
    if isinstance(e, RuntimeError) and "unexpected EOF" in text:  # the legacy format's tensor bytes cut off
        return f"{path} is truncated or damaged (its tensor data ends early: {_torch_detail(e)})"
    if isinstance(e, RuntimeError) and "Invalid magic number" in text:
        return f"{path} is a pickle but not a PyTorch checkpoint (torch.save's magic number is missing)"
    if isinstance(e, RuntimeError) and "PytorchStreamReader" in text:
        return f"{path} is damaged ({_torch_detail(e)})"
    if isinstance(e, (pickle.UnpicklingError, UnicodeDecodeError, KeyError, IndexError, struct.error)):
        return f"{path} is damaged (its pickle cannot be read: {_torch_detail(e)})"
    return f"{path}: not loaded ({_torch_detail(e)})"


def load_torch_file(path, error, allowed: str, safe_globals=(), map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True) after `_check_checkpoint_file`; any failure -> error(message naming the
    path and what is wrong with the file), never torch's own advice. Used by `load_official` and by
    `tvrn.checkpoint.load_checkpoint`. allowed: the types accepted, in words, for a refused global."""
    import warnings

    import torch

    _check_checkpoint_file(path, error)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise error(_load_failure(path, e, allowed)) from None
