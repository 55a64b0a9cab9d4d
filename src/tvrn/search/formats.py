"""The on-disk forms of a search index, all opened by `SearchIndex.load(path)`:

- a folder, version 3 (`SearchIndex.save`, and `SearchIndex.build_to` which encodes a split straight to disk,
  one batch at a time; written by `_IndexWriter`): the encodings as one `.npy` file per field
  (`tvrn.search.store`, float32 / float16 / bfloat16), read by row with pread, so a query touches its
  shortlisted candidates only; the shortlist vectors as `.npy` and, when asked for, FAISS indexes built from a
  factory string (`tvrn.search.vectors`); `model.pt`; image ids and captions as text files with their byte
  offsets, read from disk when asked; the captions of each image (`captions_by_image`); `manifest.json` with
  the sha256 of every file, checked on opening (a corrupted file is refused by name);
- a folder, version 2 (read only): the same, but ids and captions are loaded into RAM;
- a single file, version 1 (`SearchIndex.save_file`, torch.save of plain data, loaded whole): model, ids,
  captions, encodings.

A folder is written into a temporary folder beside it, `.NAME.tmp.PID@HOST`, renamed into place when complete;
a build that fails removes it, and a new build of NAME removes those whose writer is gone (a killed build).
A damaged folder (a manifest that is not UTF-8 JSON, a truncated file) is refused with a SearchIndexError
naming the file.

The readers build the index with the class they are given (`load_folder(SearchIndex, path, ...)`), and the
writers take the index to write: this module does not import `tvrn.search.index`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint import atomic_save
from ..fileio import error_reason, sha256_file, stale_temporaries, temporary_sibling
from .errors import SearchIndexError
from ..fileio import NpyRows, NpyRowWriter, StringRows, write_strings
from ..tensors import tensor_fields
from .store import FieldStore, FieldWriter
from .vectors import _train_count, _Vectors, build_faiss, check_faiss, read_faiss, write_faiss

FORMAT, VERSION = "tvrn-index", 1
DIR_VERSION = 3  # the folder form (2: ids and captions loaded into RAM; 3: read from disk when asked)


def captions_by_image(caption_to_image, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """caption_to_image (Nc,) -> (captions grouped by image, stable: (Nc,) int64; offsets (n_images + 1,) int64):
    the captions of image i are order[offsets[i]:offsets[i + 1]]."""
    c2i = np.asarray(caption_to_image, dtype=np.int64).reshape(-1)
    return np.argsort(c2i, kind="stable"), np.r_[0, np.cumsum(np.bincount(c2i, minlength=n_images))].astype(np.int64)


# ---------------------------------------------------------------------------------------------- single file
def write_file(index, path: str | os.PathLike) -> None:
    """The single-file form (version 1) of `index` (a SearchIndex): everything in one torch.save, loaded whole
    (small galleries)."""
    atomic_save({"format": FORMAT, "version": VERSION, "model": index.checkpoint, "data_root": index.data_root,
                 "split": index.split, "image_dir": index.image_dir, "image_ids": list(index.image_ids),
                 "captions": list(index.captions),
                 "caption_to_image": torch.as_tensor(np.asarray(index.caption_to_image)).long(),
                 "enc_images": tensor_fields(index.images.get(torch.arange(index.num_images))),
                 "enc_texts": tensor_fields(index.texts.get(torch.arange(index.num_captions)))}, path)


def load_file(cls, path):
    """Open a version-1 file -> cls(...) (a SearchIndex); SearchIndexError when it is not one or is damaged."""
    from ..models.base import EncodedImages, EncodedTexts
    from ..checkpoint import model_from_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle / zip errors: not a torch file at all
        raise SearchIndexError(f"{path}: not a tvrn search index ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise SearchIndexError(f"{path}: not a tvrn search index (no format {FORMAT!r}; a checkpoint is "
                               f"turned into an index with `tvrn index CHECKPOINT --data DIR --out FILE`)")
    if obj.get("version") != VERSION:
        raise SearchIndexError(f"{path}: index version {obj.get('version')}, this tvrn reads version {VERSION}")
    try:
        model, tokenizer = model_from_checkpoint(obj["model"], source=str(path))
        return cls(model, tokenizer, obj["model"], EncodedImages(**obj["enc_images"]),
                   EncodedTexts(**obj["enc_texts"]), obj["image_ids"], obj["captions"], obj["caption_to_image"],
                   data_root=obj["data_root"], split=obj["split"], image_dir=obj["image_dir"])
    except SearchIndexError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise SearchIndexError(f"{path}: a damaged tvrn search index ({error_reason(e)}); rebuild it with "
                               f"`tvrn index`") from None


# ---------------------------------------------------------------------------------------------- folder
def _manifest_problem(man: dict) -> Optional[str]:
    """What an index folder's manifest lacks of what the folder form records, or None."""
    for key in ("files", "fields", "counts"):
        if not isinstance(man.get(key), dict):
            return f"no {key!r} entry" if key not in man else f"its {key!r} entry is not an object"
    for key in ("images", "texts"):
        if not isinstance(man["fields"].get(key), dict):
            return f"no 'fields' / {key!r} entry"
    for key in ("images", "captions"):
        if not isinstance(man["counts"].get(key), int):
            return f"no 'counts' / {key!r} count"
    for key in ("data_root", "split", "image_dir"):
        if key not in man:
            return f"no {key!r} entry"
    return None


def load_folder(cls, path: Path, verify: bool, nprobe: Optional[int]):
    """Open an index folder (version 2 or 3) -> cls(...) (a SearchIndex), checking every file's sha256 unless
    verify=False; nprobe: FAISS search breadth (`read_faiss`). A damaged folder raises SearchIndexError naming
    the file: a manifest that is not UTF-8 JSON or lacks what an index records, a missing, corrupted (verify)
    or truncated file."""
    from ..models.base import EncodedImages, EncodedTexts
    from ..checkpoint import model_from_checkpoint

    try:
        raw = (path / "manifest.json").read_bytes()
    except OSError as e:
        raise SearchIndexError(f"{path}: not a tvrn index folder (manifest.json: "
                               f"{e.strerror or type(e).__name__})") from None
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SearchIndexError(f"{path}: manifest.json is not valid UTF-8 JSON ({error_reason(e)}): the index is "
                               f"damaged; rebuild it with `tvrn index`") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") not in (2, DIR_VERSION):
        raise SearchIndexError(f"{path}: manifest.json is not a tvrn index version 2 or {DIR_VERSION}")
    problem = _manifest_problem(man)
    if problem:
        raise SearchIndexError(f"{path}: manifest.json cannot be read ({problem}): the index is damaged; "
                               f"rebuild it with `tvrn index`")
    reading = "manifest.json"  # the file being read when something fails: named in the error
    try:
        if verify:
            for rel, digest in man["files"].items():
                f = path / rel
                if not f.is_file():
                    raise SearchIndexError(f"{path}: {rel} is missing")
                if sha256_file(f) != digest:
                    raise SearchIndexError(f"{path}: {rel} is corrupted (its sha256 differs from manifest.json)")
        reading = "model.pt"
        ckpt = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        model, tokenizer = model_from_checkpoint(ckpt, source=str(path / "model.pt"))
        reading = "images/"
        images = FieldStore(path / "images", man["fields"]["images"], EncodedImages)
        reading = "texts/"
        texts = FieldStore(path / "texts", man["fields"]["texts"], EncodedTexts)
        vectors = []
        for side in ("image", "text"):
            reading = f"{side}_vectors.npy"
            vec = NpyRows(path / f"{side}_vectors.npy")
            index = None
            if man.get("faiss"):
                reading = f"{side}.faiss"
                index = read_faiss(path / f"{side}.faiss", man["faiss"], nprobe)
            vectors.append(_Vectors(vec, index))
        reading = "image_ids / captions"
        if man["version"] == 2:  # ids and captions into RAM
            captions = (path / "captions.txt").read_text(encoding="utf-8").split("\n")[: man["counts"]["captions"]]
            ids = (path / "image_ids.txt").read_text(encoding="utf-8").split("\n")[: man["counts"]["images"]]
            c2i, by_image = torch.from_numpy(np.load(path / "caption_to_image.npy")), None
        else:  # read from disk when asked
            ids = StringRows(path / "image_ids.txt", path / "image_ids.offsets.npy")
            captions = StringRows(path / "captions.txt", path / "captions.offsets.npy")
            c2i = NpyRows(path / "caption_to_image.npy")
            by_image = (NpyRows(path / "image_captions.npy"), NpyRows(path / "image_captions.offsets.npy"))
            if (len(ids), len(captions), len(c2i)) != (man["counts"]["images"], man["counts"]["captions"],
                                                        man["counts"]["captions"]):
                raise SearchIndexError(f"{path}: image_ids / captions / caption_to_image do not match the counts "
                                       f"of manifest.json")
        reading = "manifest.json"
        return cls(model, tokenizer, ckpt, images, texts, ids, captions, c2i, data_root=man["data_root"],
                   split=man["split"], image_dir=man["image_dir"], vectors=tuple(vectors),
                   extract=man.get("extract"), image_captions=by_image)
    except SearchIndexError:
        raise
    except FileNotFoundError as e:
        raise SearchIndexError(f"{path}: {Path(e.filename).name if e.filename else reading} is missing (the "
                               f"index is incomplete; rebuild it with `tvrn index`)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, EOFError) as e:
        # truncated or damaged files (numpy, torch, FAISS and pickle errors), a manifest lacking a key
        raise SearchIndexError(f"{path}: {reading} cannot be read ({error_reason(e)}): the index is damaged or "
                               f"truncated; rebuild it with `tvrn index`") from None


def write_folder(index, path: str | os.PathLike, dtype: str = "float32", faiss: Optional[str] = None) -> None:
    """Write `index` (a SearchIndex) as a folder (version 3), atomically: built beside `path`, renamed into
    place. faiss: a factory string, checked before anything is written (`check_faiss`)."""
    if faiss is not None:
        check_faiss(faiss, *_train_count(index.num_images, index.num_captions))
    writer = _IndexWriter(path, index.num_images, index.num_captions, dtype)
    try:
        for start, enc in index.images.chunks():
            writer.add_images(start, enc, index.model.shortlist_embed_image(enc).float())
        for start, enc in index.texts.chunks():
            writer.add_texts(start, enc, index.model.shortlist_embed_text(enc).float())
        writer.finish(index.checkpoint, index.image_ids, index.captions, index.caption_to_image, index.data_root,
                      index.split, index.image_dir, faiss, extract=index.extract)
    except BaseException:
        writer.abort()
        raise


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


class _IndexWriter:
    """Writes an index folder into a temporary folder beside `out` (.NAME.tmp.PID@HOST), renamed into place by
    finish(); abort() removes it. Starting removes the temporary folders of earlier builds of `out` whose writer
    is gone (`stale_temporaries`)."""

    def __init__(self, out, n_images: int, n_captions: int, dtype: str, max_words: Optional[int] = None):
        self.out = Path(out)
        self.removed = stale_temporaries(self.out)
        for p in self.removed:
            _remove(p)
        self.tmp = temporary_sibling(self.out)
        if self.tmp.exists() or self.tmp.is_symlink():  # this process's own, from a build that could not clean up
            _remove(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dtype, self.max_words = dtype, max_words
        self.images = FieldWriter(self.tmp / "images", n_images, dtype)
        self.texts = None
        self.n_captions = n_captions
        self.vec = {"image": None, "text": None}
        self.sizes = {"image": n_images, "text": n_captions}

    def _vectors(self, side: str, start: int, v: torch.Tensor) -> None:
        if self.vec[side] is None:
            self.vec[side] = NpyRowWriter(self.tmp / f"{side}_vectors.npy", (self.sizes[side], v.shape[1]), np.float32)
        self.vec[side].write(start, v.detach().cpu().float().numpy())

    def add_images(self, start: int, enc, vectors: torch.Tensor) -> None:
        self.images.write(start, enc)
        self._vectors("image", start, vectors)

    def add_texts(self, start: int, enc, vectors: torch.Tensor) -> None:
        from ..models.base import WORD_AXIS_FIELDS

        if self.texts is None:  # captions of all lengths in one file: the word axis at the longest
            L = self.max_words or enc.mask.shape[1]
            shapes = {k: (L, *t.shape[2:]) for k, t in tensor_fields(enc).items() if k in WORD_AXIS_FIELDS}
            self.texts = FieldWriter(self.tmp / "texts", self.n_captions, self.dtype, max_shape=shapes)
        self.texts.write(start, enc)
        self._vectors("text", start, vectors)

    def abort(self) -> None:
        """A failed or interrupted build: close the files and remove the temporary folder."""
        for w in (self.images, self.texts, *self.vec.values()):
            if w is not None:
                w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, checkpoint: dict, image_ids, captions, caption_to_image, data_root, split, image_dir,
               faiss_spec: Optional[str], extract: Optional[dict] = None) -> None:
        for side in ("image", "text"):
            self.vec[side].close()
        meta_i, meta_t = self.images.close(), self.texts.close()
        if faiss_spec:
            for side in ("image", "text"):
                index = build_faiss(NpyRows(self.tmp / f"{side}_vectors.npy"), faiss_spec, side)
                write_faiss(index, self.tmp / f"{side}.faiss")
        torch.save(checkpoint, self.tmp / "model.pt")
        n_ids = write_strings(self.tmp / "image_ids.txt", self.tmp / "image_ids.offsets.npy", image_ids)
        n_caps = write_strings(self.tmp / "captions.txt", self.tmp / "captions.offsets.npy", captions)
        c2i = np.asarray(caption_to_image, dtype=np.int64).reshape(-1)
        if (n_ids, n_caps, len(c2i)) != (self.sizes["image"], self.sizes["text"], self.sizes["text"]):
            raise ValueError(f"{n_ids} image ids, {n_caps} captions and {len(c2i)} caption images for an index of "
                             f"{self.sizes['image']} images and {self.sizes['text']} captions")
        if len(c2i) and (c2i.min() < 0 or c2i.max() >= n_ids):
            raise ValueError(f"caption_to_image has an image outside 0..{n_ids - 1}")
        np.save(self.tmp / "caption_to_image.npy", c2i)
        order, offsets = captions_by_image(c2i, n_ids)
        np.save(self.tmp / "image_captions.npy", order)
        np.save(self.tmp / "image_captions.offsets.npy", offsets)
        files = {str(p.relative_to(self.tmp)): sha256_file(p) for p in sorted(self.tmp.rglob("*")) if p.is_file()}
        man = {"format": FORMAT, "version": DIR_VERSION, "counts": {"images": n_ids, "captions": n_caps},
               "dtype": self.dtype, "faiss": faiss_spec, "data_root": data_root, "split": split,
               "image_dir": image_dir, "fields": {"images": meta_i, "texts": meta_t}, "files": files,
               "extract": extract}
        (self.tmp / "manifest.json").write_text(json.dumps(man, indent=1))
        old = self.out.parent / f".{self.out.name}.old"
        if self.out.exists():  # replace: move the old one aside first, so a reader sees one or the other
            if old.exists() or old.is_symlink():
                _remove(old)
            os.replace(self.out, old)
            try:
                os.replace(self.tmp, self.out)
            except BaseException:  # interrupted between the renames: the previous index goes back in place
                if not self.out.exists():
                    os.replace(old, self.out)
                raise
        else:
            os.replace(self.tmp, self.out)
        if old.exists() or old.is_symlink():  # this build's, or one left by a build killed between the renames
            _remove(old)


__all__ = ["DIR_VERSION", "FORMAT", "VERSION", "captions_by_image", "load_file", "load_folder", "write_file",
           "write_folder"]
