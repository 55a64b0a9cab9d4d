"""Files that matter: atomic writes (a temporary file in the destination folder, fsync, then os.replace, so a
reader, or a run resumed after a kill, sees the old file or the new one, never half of one), and checked loading
of torch files (what is wrong with a file that is empty, truncated, damaged or no checkpoint at all, by its path,
before torch's own message and advice can reach a user)."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


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
    `tvrn.train.checkpoint.load_checkpoint`. allowed: the types accepted, in words, for a refused global."""
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
