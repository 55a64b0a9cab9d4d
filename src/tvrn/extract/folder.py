"""A folder of images -> one precomp split, written incrementally and resumable; the data folder's manifest.

`extract_split(extractor, image_dir, files, out_dir, split)` writes, for the images `files` (relative paths):

| file                  | content                                                            |
|-----------------------|--------------------------------------------------------------------|
| SPLIT_ims.npy         | float32 (N, R, Dv) region features                                 |
| SPLIT_ims_bbx.npy     | float32 (N, R, 4) boxes x1, y1, x2, y2 in pixels of the oriented image |
| SPLIT_ims_size.npy    | float32 (N, 2) width, height (after the EXIF rotation)             |
| SPLIT_ids.txt         | image ids (relative path without extension); SPLIT_files.txt the paths |

The arrays are preallocated with `np.lib.format.open_memmap` under temporary names (.SPLIT_ims.npy.partial,
...) and filled batch by batch; after each batch the rows are flushed and `.SPLIT.progress.json` records
how many are done (written atomically). A run killed at any point continues from the last recorded batch,
with the same batch boundaries, so the result has the same bytes as an uninterrupted run; the progress file
also records the recipe and the file list, and a resume with another recipe or another list is refused.
At the end the files are renamed into place (after dropping the rows of images skipped as unreadable).
Memory is flat in the number of images: one batch of images and features at a time.

`manifest.json` in the data folder records the extractor (`RegionExtractor.describe()`: backbone, weights
sha256, region recipe, input size, R) and each split's files; a run with another recipe into the same folder
is refused (`RecipeMismatchError`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..fileio import atomic_write, write_json
from .features import RegionExtractor, recipe_difference, same_recipe
from .images import ImageReadError, image_id

MANIFEST = "manifest.json"
FORMAT, VERSION = "tvrn-extract", 1
ARRAYS = ("ims", "ims_bbx", "ims_size")


class RecipeMismatchError(ValueError):
    """Features of another extraction recipe are already in the data folder (or in an interrupted run)."""


@dataclass
class SplitResult:
    split: str
    files: list[str]  # the images kept, in row order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of unreadable images
    resumed_from: int = 0  # images already done by an interrupted run
    seconds: float = 0.0  # time of this run's extraction (not counting a resumed part)
    extracted: int = 0  # images this run extracted


def _valid_batch_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _list_hash(files: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest()


def read_manifest(out_dir: str | os.PathLike) -> Optional[dict]:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        man = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RecipeMismatchError(f"{p}: not a readable manifest ({e})") from None
    if man.get("format") != FORMAT:
        raise RecipeMismatchError(f"{p}: not a tvrn extract manifest (format {man.get('format')!r})")
    return man


def check_recipe(out_dir: str | os.PathLike, extractor: dict) -> None:
    """Refuse to add features of `extractor` (a describe() dict) to a data folder made with another recipe."""
    man = read_manifest(out_dir)
    if man is not None and not same_recipe(man["extractor"], extractor):
        raise RecipeMismatchError(
            f"{Path(out_dir) / MANIFEST}: this data folder holds features of another recipe "
            f"({'; '.join(recipe_difference(man['extractor'], extractor))}); features of two recipes cannot "
            f"be mixed: extract into another folder")


def update_manifest(out_dir: str | os.PathLike, extractor: dict, split: str, entry: dict) -> dict:
    man = read_manifest(out_dir) or {"format": FORMAT, "version": VERSION, "extractor": extractor, "splits": {}}
    man["splits"][split] = entry
    write_json(Path(out_dir) / MANIFEST, man, indent=1)
    return man


def _load(extractor: RegionExtractor, image_dir: Path, rel: str):
    """-> (input, boxes, size) or the ImageReadError (ImageTooLargeError above the extractor's max_pixels)."""
    try:
        return extractor.prepare_file(image_dir / rel)
    except ImageReadError as e:
        return e
    except FileNotFoundError as e:
        return ImageReadError(image_dir / rel, f"file not found ({e.strerror})")


def extract_split(extractor: RegionExtractor, image_dir: str | os.PathLike, files: Sequence[str],
                  out_dir: str | os.PathLike, split: str, batch_size: int = 16, workers: int = 2,
                  skip_bad: bool = False, restart: bool = False,
                  progress: Optional[Callable[[int, int], None]] = None,
                  stop_after: Optional[int] = None) -> SplitResult:
    """Extract `files` (relative to image_dir) into out_dir/SPLIT_* (see the module doc).

    batch_size: images per backbone call (a resumed run keeps the interrupted run's); workers: decoding
    threads. skip_bad: leave unreadable images out (listed in the result) instead of raising ImageReadError.
    restart: discard an interrupted run's files instead of resuming. progress(done, total) after each batch.
    stop_after: return after this many images are done, leaving the run resumable (a kill, for tests).
    """
    if not _valid_batch_size(batch_size):  # 0 or less never advances: a run that hangs, and a progress file
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")  # that keeps it
    image_dir, out = Path(image_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list(files)
    n, desc = len(files), extractor.describe()
    if n == 0:
        raise ValueError(f"split {split!r} has no images")
    check_recipe(out, desc)
    r, dv = desc["num_regions"], desc["feature_size"]
    partial = {a: out / f".{split}_{a}.npy.partial" for a in ARRAYS}
    shapes = {"ims": (n, r, dv), "ims_bbx": (n, r, 4), "ims_size": (n, 2)}
    prog_path = out / f".{split}.progress.json"
    state = {"extractor": desc, "files_sha256": _list_hash(files), "n": n, "batch_size": batch_size,
             "done": 0, "bad": []}
    mode = "w+"
    if prog_path.is_file() and not restart:
        old = json.loads(prog_path.read_text())
        if not same_recipe(old["extractor"], desc):
            raise RecipeMismatchError(
                f"{prog_path}: an interrupted extraction of split {split!r} used another recipe "
                f"({'; '.join(recipe_difference(old['extractor'], desc))}); rerun with its settings or restart")
        if old["files_sha256"] != state["files_sha256"] or old["n"] != n:
            raise RecipeMismatchError(
                f"{prog_path}: an interrupted extraction of split {split!r} had another list of images "
                f"({old['n']} images, now {n}); restart it (--restart) to begin again")
        done = old.get("done")
        if not _valid_batch_size(old.get("batch_size")) or not isinstance(done, int) or not 0 <= done <= n:
            # written by a version that took any batch size: with 0 or less no batch ever ended, so nothing of
            # the old run is usable (done stayed 0 or went negative); begin again with this run's batch size
            if isinstance(done, int) and 0 < done <= n:
                raise RecipeMismatchError(
                    f"{prog_path}: an interrupted extraction of split {split!r} records an invalid batch size "
                    f"{old.get('batch_size')!r}; restart it (--restart) to begin again")
        elif all(p.is_file() for p in partial.values()):
            state, mode = old, "r+"
    arrays = {a: np.lib.format.open_memmap(partial[a], mode=mode, dtype=np.float32, shape=shapes[a]) for a in ARRAYS}
    for a in ARRAYS:
        if arrays[a].shape != shapes[a]:
            raise RecipeMismatchError(f"{partial[a]}: shape {arrays[a].shape}, expected {shapes[a]}; restart")
    if mode == "w+":
        write_json(prog_path, state, indent=1)
    bs = int(state["batch_size"])
    result = SplitResult(split, [], resumed_from=int(state["done"]))
    bad = {int(i): (f, why) for i, f, why in state["bad"]}
    t0 = time.perf_counter()
    if progress:
        progress(int(state["done"]), n)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        start = int(state["done"])
        while start < n:
            if stop_after is not None and start >= stop_after:
                return result
            stop = min(start + bs, n)
            loaded = list(pool.map(lambda f: _load(extractor, image_dir, f), files[start:stop]))
            good = []
            for j, item in enumerate(loaded):
                if isinstance(item, ImageReadError):
                    if not skip_bad:
                        raise item
                    bad[start + j] = (files[start + j], item.problem)
                else:
                    good.append(j)
            if good:
                x = torch.stack([loaded[j][0] for j in good])  # (b, 3, S, S)
                boxes = np.stack([loaded[j][1] for j in good])  # (b, R, 4)
                sizes = np.stack([loaded[j][2] for j in good])  # (b, 2)
                feats = extractor.features(x, boxes, sizes)  # (b, R, Dv)
                rows = np.array(good) + start
                arrays["ims"][rows], arrays["ims_bbx"][rows], arrays["ims_size"][rows] = feats, boxes, sizes
            for a in ARRAYS:
                arrays[a].flush()
            state["done"], state["bad"] = stop, [[i, f, why] for i, (f, why) in sorted(bad.items())]
            write_json(prog_path, state, indent=1)  # only after the rows are on disk
            result.extracted += stop - start
            start = stop
            if progress:
                progress(stop, n)
    result.seconds = time.perf_counter() - t0
    keep = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
    if len(keep) == 0:
        raise ImageReadError(image_dir, f"none of the {n} images of split {split!r} could be read")
    for a in ARRAYS:
        arrays[a].flush()
        final = out / f"{split}_{a}.npy"
        if len(keep) == n:
            del arrays[a]
            os.replace(partial[a], final)
        else:  # copy the kept rows, a chunk at a time, into a file of their own, then rename it
            tmp = out / f".{split}_{a}.npy.kept"
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keep),) + shapes[a][1:])
            for c in range(0, len(keep), 256):
                dst[c:c + 256] = arrays[a][keep[c:c + 256]]
            dst.flush()
            del dst, arrays[a]
            os.replace(tmp, final)
            os.unlink(partial[a])
    result.files = [files[i] for i in keep]
    result.skipped = [bad[i] for i in sorted(bad)]
    for name, lines in (("ids", [image_id(f) for f in result.files]), ("files", result.files)):
        data = ("\n".join(lines) + "\n").encode("utf-8")
        atomic_write(out / f"{split}_{name}.txt", lambda f, d=data: f.write(d))
    update_manifest(out, desc, split, {"images": len(result.files), "files_sha256": _list_hash(result.files),
                                       "skipped": [list(b) for b in result.skipped]})
    prog_path.unlink()
    return result
