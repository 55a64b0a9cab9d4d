"""Captions in the formats people have, matched to image files, split, and written in the precomp layout.

Formats (`read_captions(path, fmt="auto")`, one `CaptionRecord(image, caption, where)` per caption):

| fmt       | file                                                                                   |
|-----------|----------------------------------------------------------------------------------------|
| csv / tsv | `image,caption` rows (`,` `;` `|` or tab), an optional header naming the two columns      |
|           | (image / image_name / file_name / filename / file / path, and caption / comment / text / |
|           | sentence / raw); Flickr30K's Kaggle `results.csv` (image_name| comment_number| comment) |
| jsonl     | one object a line: {"image": ..., "caption": ...} (or "captions": [...])               |
| coco      | COCO captions JSON: {"images": [{"id", "file_name"}], "annotations": [{"image_id",     |
|           | "caption"}]}; also Karpathy's dataset_*.json ({"images": [{"filename", "sentences":    |
|           | [{"raw"}], "split"}]}), whose split field `split_of` returns                           |
| flickr    | the Flickr30K / Flickr8K token file: `name.jpg#0<TAB>caption`                          |

"auto" picks by extension (.json coco, .jsonl / .ndjson jsonl, .csv csv, .tsv tsv, .token flickr) and, for
.txt, by the first line (`#digit<TAB>` flickr, a tab tsv, else csv). Any number of captions per image.
Every error is a `CaptionFileError` naming the file and the line (or the JSON entry) and the problem.

Images are named in a caption file by relative path, file name or file name without extension; `match_images`
resolves them against a folder listing. `assign_splits` gives each image a split: one named split, a seeded
random split by fractions, or a file of `image split` lines. `write_split_captions` writes SPLIT_caps.txt and
SPLIT_cap2img.txt (the caption -> image map the data layer reads) atomically.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..fileio import atomic_write
from .errors import TvrnDataError, utf8_error_position

CAPTION_FORMATS = ("auto", "csv", "tsv", "jsonl", "coco", "flickr")
IMAGE_KEYS = ("image", "image_name", "file_name", "filename", "file", "path", "image_path", "img")
CAPTION_KEYS = ("caption", "comment", "text", "sentence", "raw", "captions")
_FLICKR = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


class CaptionFileError(TvrnDataError):
    """A caption file that cannot be read: names the file, the line or entry, and the problem."""

    def __init__(self, file: str | os.PathLike, where: Optional[str], problem: str):
        self.file, self.where, self.problem = str(file), where, problem
        super().__init__(f"{self.file}{', ' + where if where else ''}: {problem}")


@dataclass(frozen=True)
class CaptionRecord:
    image: str  # as written in the caption file
    caption: str  # whitespace collapsed to single spaces
    where: str  # "line 3" / "annotation 7" / "images[2].sentences[1]", for errors
    split: Optional[str] = None  # Karpathy's split field, when the format has one


def _clean(text, file, where) -> str:
    if not isinstance(text, str):
        raise CaptionFileError(file, where, f"caption must be a string, got {type(text).__name__} {text!r:.40}")
    text = " ".join(text.split())
    if not text:
        raise CaptionFileError(file, where, "empty caption")
    return text


def detect_format(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    by_ext = {".json": "coco", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".token": "flickr"}
    if ext in by_ext:
        return by_ext[ext]
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
    if _FLICKR.match(first.rstrip("\r\n")):
        return "flickr"
    return "tsv" if "\t" in first else "csv"


def read_captions(path: str | os.PathLike, fmt: str = "auto") -> list[CaptionRecord]:
    """A caption file -> [CaptionRecord] in file order. Raises CaptionFileError (file, line, problem)."""
    if fmt not in CAPTION_FORMATS:
        raise ValueError(f"unknown caption format {fmt!r}, expected one of {CAPTION_FORMATS}")
    if not Path(path).is_file():
        raise CaptionFileError(path, None, "caption file not found")
    if fmt == "auto":
        fmt = detect_format(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        with open(path, "rb") as fb:  # the offset in the file (the decoder's skips a byte-order mark)
            found = utf8_error_position(fb.read())
        line, offset, byte, reason = found or (text_line_of_byte(path, e.start), e.start, None, e.reason)
        what = f"byte 0x{byte:02x} at byte offset {offset}" if byte is not None else f"byte offset {offset}"
        raise CaptionFileError(path, f"line {line}", f"not UTF-8 text ({what}: {reason}); save the file as "
                                                     f"UTF-8") from None
    records = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl, "coco": _read_coco,
               "flickr": _read_flickr}[fmt](text, str(path), fmt)
    if not records:
        raise CaptionFileError(path, None, f"no captions found (read as {fmt})")
    return records


def text_line_of_byte(path, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _read_flickr(text: str, file: str, fmt: str) -> list[CaptionRecord]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _FLICKR.match(line)
        if not m:
            raise CaptionFileError(file, f"line {i}", f"expected 'name.jpg#N<TAB>caption', got {line[:60]!r}")
        out.append(CaptionRecord(m["image"].strip(), _clean(m["caption"], file, f"line {i}"), f"line {i}"))
    return out


def _read_delimited(text: str, file: str, fmt: str) -> list[CaptionRecord]:
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if fmt == "tsv":
        delim = "\t"
    else:  # the first of , | ; tab that the first line has (Flickr30K's Kaggle csv uses '|')
        delim = min((first.find(d), d) for d in ",|;\t" if d in first)[1] if any(d in first for d in ",|;\t") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim, skipinitialspace=True)
    out, img_col, cap_col, ncols = [], 0, 1, None
    for row in reader:
        i = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        if ncols is None:  # the first row: a header, or data with two columns
            lower = [c.lower() for c in cells]
            img = next((lower.index(k) for k in IMAGE_KEYS if k in lower), None)
            cap = next((lower.index(k) for k in CAPTION_KEYS if k in lower), None)
            if img is not None and cap is not None:
                img_col, cap_col, ncols = img, cap, len(cells)
                continue
            if len(cells) != 2:
                raise CaptionFileError(file, f"line {i}", f"expected 2 columns 'image{delim}caption' or a header "
                                       f"naming them, got {len(cells)}: {cells[:4]}")
            ncols = 2
        if len(cells) <= max(img_col, cap_col):
            raise CaptionFileError(file, f"line {i}", f"expected {ncols} columns, got {len(cells)}: {cells[:4]} "
                                   f"(a caption containing {delim!r} must be quoted)")
        if ncols == 2 and len(cells) > 2:
            raise CaptionFileError(file, f"line {i}", f"expected 2 columns, got {len(cells)} (a caption "
                                   f"containing {delim!r} must be quoted)")
        if not cells[img_col]:
            raise CaptionFileError(file, f"line {i}", "empty image name")
        out.append(CaptionRecord(cells[img_col], _clean(cells[cap_col], file, f"line {i}"), f"line {i}"))
    return out


def _pick(obj: dict, keys: Sequence[str]):
    return next((obj[k] for k in keys if k in obj), None)


def _read_jsonl(text: str, file: str, fmt: str) -> list[CaptionRecord]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionFileError(file, f"line {i}", f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise CaptionFileError(file, f"line {i}", f"expected a JSON object, got {type(obj).__name__}")
        image, caption = _pick(obj, IMAGE_KEYS), _pick(obj, CAPTION_KEYS)
        if not isinstance(image, str) or not image.strip():
            raise CaptionFileError(file, f"line {i}", f"no image name (a string under one of {list(IMAGE_KEYS)})")
        if caption is None:
            raise CaptionFileError(file, f"line {i}", f"no caption (under one of {list(CAPTION_KEYS)})")
        for cap in caption if isinstance(caption, list) else [caption]:
            out.append(CaptionRecord(image.strip(), _clean(cap, file, f"line {i}"), f"line {i}"))
    return out


def _read_coco(text: str, file: str, fmt: str) -> list[CaptionRecord]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(file, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise CaptionFileError(file, None, "expected a JSON object with an 'images' list (COCO captions or "
                                           "Karpathy's dataset_*.json)")
    out = []
    if "annotations" not in obj:  # Karpathy's form: sentences inside each image
        for i, im in enumerate(obj["images"]):
            where = f"images[{i}]"
            if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
                raise CaptionFileError(file, where, "expected an object with a 'filename' string")
            name = "/".join(p for p in (im.get("filepath"), im["filename"]) if p)
            for j, s in enumerate(im.get("sentences") or []):
                raw = s.get("raw") if isinstance(s, dict) else None
                if raw is None and isinstance(s, dict) and "tokens" in s:
                    raw = " ".join(s["tokens"])
                out.append(CaptionRecord(name, _clean(raw, file, f"{where}.sentences[{j}]"),
                                         f"{where}.sentences[{j}]", im.get("split")))
        return out
    names = {}
    for i, im in enumerate(obj["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise CaptionFileError(file, f"images[{i}]", "expected an object with 'id' and a 'file_name' string")
        names[im["id"]] = im["file_name"]
    if not isinstance(obj["annotations"], list):
        raise CaptionFileError(file, None, "'annotations' must be a list")
    for i, ann in enumerate(obj["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CaptionFileError(file, where, "expected an object with 'image_id' and 'caption'")
        if ann["image_id"] not in names:
            raise CaptionFileError(file, where, f"image_id {ann['image_id']!r} is not in 'images'")
        out.append(CaptionRecord(names[ann["image_id"]], _clean(ann["caption"], file, where), where))
    return out


# ---------------------------------------------------------------------------- images, splits, writing

def match_images(records: Sequence[CaptionRecord], files: Sequence[str], caption_file: str = "<captions>",
                 skip_missing: bool = False) -> tuple["OrderedDict[str, list[str]]", list[CaptionRecord]]:
    """Resolve each record's image against `files` (relative paths from `list_images`): by relative path, then
    file name, then name without extension (when unique) -> ({file: [captions in file order]} in the order of
    `files`, records whose image is not there). Without skip_missing, a missing image raises
    CaptionFileError naming the first such line and how many there are."""
    by_path = {f: f for f in files}
    by_name, by_stem = {}, {}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        by_name.setdefault(name, []).append(f)
        by_stem.setdefault(name.rsplit(".", 1)[0], []).append(f)
    caps: dict[str, list[str]] = {}
    missing = []
    for r in records:
        key = r.image.replace("\\", "/")
        key = key[2:] if key.startswith("./") else key
        f = by_path.get(key)
        if f is None:
            name = key.rsplit("/", 1)[-1]
            for table, k in ((by_name, name), (by_stem, name), (by_stem, name.rsplit(".", 1)[0])):
                if len(table.get(k, ())) == 1:
                    f = table[k][0]
                    break
        if f is None:
            missing.append(r)
            continue
        caps.setdefault(f, []).append(r.caption)
    if missing and not skip_missing:
        r = missing[0]
        raise CaptionFileError(caption_file, r.where, f"image {r.image!r} is not in the image folder "
                                                      f"({len(missing)} caption(s) name a missing image)")
    return OrderedDict((f, caps[f]) for f in files if f in caps), missing


def parse_fractions(spec: str) -> dict[str, float]:
    """"train=0.8,dev=0.1,test=0.1" -> {"train": 0.8, "dev": 0.1, "test": 0.1} (fractions summing to 1)."""
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad split spec {spec!r}: expected name=fraction,...") from None
    if any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1) > 1e-6 or not all(out):
        raise ValueError(f"bad split spec {spec!r}: fractions must be >= 0 and sum to 1")
    return out


def assign_splits(images: Sequence[str], split: Optional[str] = None, fractions: Optional[dict] = None,
                  seed: int = 0, split_file: Optional[str] = None, given: Optional[dict] = None) -> dict[str, list[str]]:
    """images (in order) -> {split: [images in the same order]}. One of: `split` (all in one), `fractions`
    (seeded random: the counts are round(f * N), the first split takes the remainder), `split_file` (lines
    `image<space or tab>split`; an image not listed is left out), `given` ({image: split}, e.g. Karpathy's)."""
    images = list(images)
    if split_file is not None:
        given = {}
        lookup = {}
        for f in images:
            for k in (f, f.rsplit("/", 1)[-1], f.rsplit("/", 1)[-1].rsplit(".", 1)[0]):
                lookup.setdefault(k, f)
        with open(split_file, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").rsplit(None, 1)
                if len(parts) != 2:
                    raise CaptionFileError(split_file, f"line {i}", f"expected 'image split', got {line.strip()[:60]!r}")
                if parts[0] not in lookup:
                    raise CaptionFileError(split_file, f"line {i}", f"image {parts[0]!r} has no file or no caption")
                given[lookup[parts[0]]] = parts[1]
    if given is not None:
        out: dict[str, list[str]] = {}
        for f in images:
            if given.get(f):
                out.setdefault(given[f], []).append(f)
        return out
    if fractions is not None:
        names = list(fractions)
        n = len(images)
        counts = [round(fractions[s] * n) for s in names]
        counts[0] = n - sum(counts[1:])
        if counts[0] < 0:
            raise ValueError(f"split fractions {fractions} do not fit {n} images")
        perm = np.random.default_rng(seed).permutation(n)
        label = np.empty(n, dtype=object)
        start = 0
        for s, c in zip(names, counts):
            label[perm[start:start + c]] = s
            start += c
        return {s: [f for f, lab in zip(images, label) if lab == s] for s in names if (label == s).any()}
    return {split or "test": images}


def write_split_captions(root: str | os.PathLike, split: str, captions: Sequence[Sequence[str]]) -> None:
    """captions[i]: the captions of image i (row i of SPLIT_ims.npy), at least one each -> SPLIT_caps.txt (all
    captions, grouped by image) and SPLIT_cap2img.txt (each caption's image index), both written atomically."""
    lines, c2i = [], []
    for i, caps in enumerate(captions):
        if not caps:
            raise ValueError(f"image {i} of split {split!r} has no caption")
        lines += [" ".join(c.split()) for c in caps]
        c2i += [i] * len(caps)
    caps_data = ("\n".join(lines) + "\n").encode("utf-8")
    map_data = ("\n".join(map(str, c2i)) + "\n").encode()
    atomic_write(Path(root) / f"{split}_cap2img.txt", lambda f: f.write(map_data))
    atomic_write(Path(root) / f"{split}_caps.txt", lambda f: f.write(caps_data))


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


def split_of(records: Iterable[CaptionRecord]) -> dict[str, str]:
    """{image as named: split} from records that carry one (Karpathy's JSON: train and restval -> train,
    val -> dev, test -> test)."""
    return {r.image: KARPATHY_SPLITS.get(r.split, r.split) for r in records if r.split}
