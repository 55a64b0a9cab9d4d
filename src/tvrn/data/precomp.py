"""Reader for SCAN's "precomp" layout (one folder per dataset, files prefixed by the split name).

| file                 | content                                                     | required |
|----------------------|-------------------------------------------------------------|----------|
| SPLIT_ims.npy        | float32 (N_img, R, Dv) region features                      | yes      |
| SPLIT_caps.txt       | one caption per line, 5 consecutive lines per image         | yes      |
| SPLIT_cap2img.txt    | one image index per caption line (any number per image)     | no       |
| SPLIT_ids.txt        | one original image id per line                              | no       |
| SPLIT_ims_bbx.npy    | (N_img, R, 4) region boxes x1, y1, x2, y2 in pixels         | no       |
| SPLIT_ims_size.npy   | (N_img, 2) image width, height                              | no       |

Two layouts are accepted: 5 captions per image (N_caps == 5 * N_img), and the variant that repeats each
image 5 times (N_img == N_caps); in both, caption i belongs to image i // 5, and the reader exposes unique
images only (unique image u is row 5 * u of a repeated file). With SPLIT_cap2img.txt beside the captions
(what `tvrn extract` writes), caption i belongs to image cap2img[i] instead: any number of captions per image,
in any order, one row of SPLIT_ims.npy per image, every image with at least one caption. The optional files may have one row per row
of SPLIT_ims.npy or one per unique image; SPLIT_ids.txt may also have one line per caption.

Feature files are never read whole: `np.load(mmap_mode="r")` parses the header (shape, dtype, data offset),
then the requested rows are copied out with positional reads (`os.preadv`), one read per contiguous run of
rows. Plain reads go through the page cache, which does not count toward the process's resident memory, so
memory stays flat however large the file is, and the reader is safe to share with DataLoader workers.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .errors import (
    CaptionCountError,
    CaptionMapError,
    FeatureFileError,
    EmptyCaptionError,
    MissingFileError,
    NonFiniteFeatureError,
    TextEncodingError,
    text_encoding_error,
)
from ..fileio import NpyRows
from .geometry import check_boxes

SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5
COCO_DEV_CAPTIONS = 5000  # COCO validation: the first 5000 dev captions (1000 images)
Indices = Union[int, Sequence[int], np.ndarray, slice]


def _read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file, stripped; a trailing newline does not make an extra line. A file that is not
    UTF-8 raises `TextEncodingError` (file, line, byte offset of the first bad byte)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        err = text_encoding_error(path)
        if err is None:  # the file changed under us: report what the decoder saw
            err = TextEncodingError(path, 0, e.start, None, e.reason)
        raise err from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def _as_indices(indices: Indices, n: int) -> np.ndarray:
    """int / sequence / slice -> (k,) int64 indices into range(n); negative ints count from the end."""
    if isinstance(indices, slice):
        return np.arange(n, dtype=np.int64)[indices]
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"image index out of range 0..{n - 1}: {indices}")
    return idx


class PrecompSplit:
    """One split of a precomp dataset.

    num_images:       N_img unique images; num_captions: N_caps captions (5 * N_img without a caption map)
    captions:         list of N_caps caption strings (stripped)
    caption_to_image: (N_caps,) int64, image index of each caption (SPLIT_cap2img.txt, else i // 5)
    image_features(indices) -> (n, R, Dv) float32; boxes(indices) -> (n, R, 4) float32 or None
    sizes:            (N_img, 2) float32 width, height, or None; ids: list of N_img str, or None

    `limit_captions` keeps only the first captions (a multiple of 5) and their images: COCO validation uses
    `limit_captions=COCO_DEV_CAPTIONS` on dev. `check_finite` checks every feature row as it is read
    (raises `NonFiniteFeatureError`); `validate()` checks the whole split in chunks.
    """

    def __init__(
        self,
        root: "str | os.PathLike[str]",
        split: str,
        limit_captions: Optional[int] = None,
        check_finite: bool = True,
    ):
        self.root = os.fspath(root)
        self.split = split
        self.check_finite = check_finite
        self.features_file = self._path("ims.npy")
        self.captions_file = self._path("caps.txt")
        for path, what in ((self.features_file, "image features"), (self.captions_file, "captions")):
            if not os.path.isfile(path):
                raise MissingFileError(path, f"{what} file of split {split!r}")

        self._features = NpyRows(self.features_file, FeatureFileError)
        if self._features.dtype != np.float32 or len(self._features.shape) != 3:
            raise FeatureFileError(
                self.features_file,
                f"expected float32 (N_img, R, Dv), got {self._features.dtype} {self._features.shape}",
            )
        captions = _read_lines(self.captions_file)
        for i, c in enumerate(captions):
            if not c:
                raise EmptyCaptionError(self.captions_file, i + 1)

        self.caption_map_file = self._path("cap2img.txt")
        n_rows, n_caps = len(self._features), len(captions)
        if os.path.isfile(self.caption_map_file):  # explicit caption -> image map, any number per image
            self.repeated_images, self._row_stride = False, 1
            c2i = read_caption_map(self.caption_map_file, n_caps, n_rows, self.captions_file, self.features_file)
            if limit_captions is not None:
                if limit_captions <= 0:
                    raise ValueError(f"limit_captions must be positive, got {limit_captions}")
                cut_inside = limit_captions < len(c2i) and c2i[limit_captions] in c2i[:limit_captions]
                captions, c2i = captions[:limit_captions], c2i[:limit_captions]
                n_img = int(c2i.max()) + 1
                if cut_inside or len(np.unique(c2i)) != n_img:
                    raise ValueError(f"limit_captions={limit_captions} does not keep whole images 0..{n_img - 1} "
                                     f"of {self.caption_map_file}")
                n_rows = n_img
            self.captions: list[str] = captions
            self.num_captions, self.num_images = len(captions), n_rows
            self.caption_to_image = c2i
        else:
            # layout: 5 captions per image, or every image repeated 5 times (then unique image u is row 5u)
            if n_caps > 0 and n_caps == CAPTIONS_PER_IMAGE * n_rows:
                self.repeated_images = False
            elif n_caps > 0 and n_rows == n_caps and n_caps % CAPTIONS_PER_IMAGE == 0:
                self.repeated_images = True
            else:
                raise CaptionCountError(n_rows, n_caps, self.features_file, self.captions_file)
            self._row_stride = CAPTIONS_PER_IMAGE if self.repeated_images else 1

            if limit_captions is not None:
                if limit_captions <= 0 or limit_captions % CAPTIONS_PER_IMAGE:
                    raise ValueError(f"limit_captions must be a positive multiple of 5, got {limit_captions}")
                captions = captions[:limit_captions]
            self.captions = captions
            self.num_captions = len(captions)
            self.num_images = self.num_captions // CAPTIONS_PER_IMAGE
            self.caption_to_image = np.arange(self.num_captions, dtype=np.int64) // CAPTIONS_PER_IMAGE

        self.boxes_file = self._path("ims_bbx.npy")
        self._boxes: Optional[NpyRows] = None
        self._boxes_stride = 1
        if os.path.isfile(self.boxes_file):
            self._boxes = NpyRows(self.boxes_file, FeatureFileError)
            if len(self._boxes.shape) != 3 or self._boxes.shape[1:] != (self._features.shape[1], 4):
                raise FeatureFileError(
                    self.boxes_file, f"expected (N_img, {self._features.shape[1]}, 4), got {self._boxes.shape}"
                )
            self._boxes_stride = self._stride_for(len(self._boxes), self.boxes_file)

        self.sizes_file = self._path("ims_size.npy")
        self.sizes: Optional[np.ndarray] = None
        if os.path.isfile(self.sizes_file):
            sizes = np.load(self.sizes_file)
            if sizes.ndim != 2 or sizes.shape[1] != 2:
                raise FeatureFileError(self.sizes_file, f"expected (N_img, 2) width, height, got {sizes.shape}")
            stride = self._stride_for(len(sizes), self.sizes_file)
            self.sizes = np.ascontiguousarray(sizes[::stride][: self.num_images], dtype=np.float32)

        self.ids_file = self._path("ids.txt")
        self.ids: Optional[list[str]] = None
        if os.path.isfile(self.ids_file):
            ids = _read_lines(self.ids_file)
            stride = self._stride_for(len(ids), self.ids_file, allow_per_caption=True)
            self.ids = ids[::stride][: self.num_images]

    # --- files ---

    def _path(self, suffix: str) -> str:
        return os.path.join(self.root, f"{self.split}_{suffix}")

    def _stride_for(self, n: int, path: str, allow_per_caption: bool = False) -> int:
        """Rows of an optional per-image file: one per feature row, or one per unique image (or per caption)."""
        n_rows = len(self._features)
        n_unique = n_rows // self._row_stride
        if n == n_rows:
            return self._row_stride
        if n == n_unique or (allow_per_caption and n == CAPTIONS_PER_IMAGE * n_unique):
            return 1 if n == n_unique else CAPTIONS_PER_IMAGE
        expected = sorted({n_rows, n_unique} | ({CAPTIONS_PER_IMAGE * n_unique} if allow_per_caption else set()))
        raise FeatureFileError(path, f"has {n} rows, expected one of {expected} to match {self.features_file}")

    # --- shapes ---

    @property
    def num_regions(self) -> int:
        """R, regions per image."""
        return self._features.shape[1]

    @property
    def feature_size(self) -> int:
        """Dv, region feature size."""
        return self._features.shape[2]

    @property
    def has_boxes(self) -> bool:
        return self._boxes is not None

    def __repr__(self) -> str:
        return (
            f"PrecompSplit(root={self.root!r}, split={self.split!r}, num_images={self.num_images}, "
            f"num_captions={self.num_captions}, R={self.num_regions}, Dv={self.feature_size}, "
            f"boxes={self.has_boxes}, repeated_images={self.repeated_images})"
        )

    # --- rows ---

    def image_features(self, indices: Indices) -> np.ndarray:
        """Region features of the images `indices` (n,) -> (n, R, Dv) float32; reads only those rows.

        With check_finite, raises `NonFiniteFeatureError` naming the first image with NaN / inf.
        """
        idx = _as_indices(indices, self.num_images)
        feats = self._features.rows(idx * self._row_stride)
        if self.check_finite:
            self._check_finite(feats, idx)
        return feats

    def boxes(self, indices: Indices) -> Optional[np.ndarray]:
        """Region boxes of the images `indices` (n,) -> (n, R, 4) float32 x1, y1, x2, y2, or None without a
        boxes file. Raises `DegenerateBoxError` (file, image, region, box) for a box with x2 < x1 or y2 < y1."""
        if self._boxes is None:
            return None
        idx = _as_indices(indices, self.num_images)
        boxes = self._boxes.rows(idx * self._boxes_stride).astype(np.float32, copy=False)
        check_boxes(boxes, index=idx, file=self.boxes_file)
        return boxes

    def _check_finite(self, feats: np.ndarray, idx: np.ndarray) -> None:
        finite = np.isfinite(feats).all(axis=tuple(range(1, feats.ndim)))  # (n,)
        if not finite.all():
            raise NonFiniteFeatureError(self.features_file, int(idx[np.argmin(finite)]))

    def iter_chunks(self, max_bytes: int = 64 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream the split in order: yields (indices (n,), features (n, R, Dv)) with n * R * Dv * 4 <= max_bytes."""
        per_chunk = max(1, max_bytes // self._features.row_bytes)
        for start in range(0, self.num_images, per_chunk):
            idx = np.arange(start, min(start + per_chunk, self.num_images), dtype=np.int64)
            yield idx, self.image_features(idx)

    def validate(self, max_bytes: int = 64 << 20) -> None:
        """Read the whole split in chunks of at most max_bytes and check it: finite features (always, whatever
        check_finite says), valid boxes, finite sizes. Raises the first problem found (a `TvrnDataError`)."""
        per_chunk = max(1, max_bytes // self._features.row_bytes)
        for start in range(0, self.num_images, per_chunk):
            idx = np.arange(start, min(start + per_chunk, self.num_images), dtype=np.int64)
            self._check_finite(self._features.rows(idx * self._row_stride), idx)
            self.boxes(idx)
        if self.sizes is not None:
            finite = np.isfinite(self.sizes).all(1)
            if not finite.all():
                raise NonFiniteFeatureError(self.sizes_file, int(np.argmin(finite)), what="size")


def read_caption_map(path: str, num_captions: int, num_images: int, captions_file: str = "",
                     features_file: str = "") -> np.ndarray:
    """SPLIT_cap2img.txt (one 0-based image index per line) -> (N_caps,) int64, checked: one line per caption,
    every value in [0, N_img), every image with at least one caption. Raises `CaptionMapError` (file, line)."""
    lines = _read_lines(path)
    if len(lines) != num_captions:
        raise CaptionMapError(path, None, f"has {len(lines)} lines but {captions_file} has {num_captions} captions")
    out = np.empty(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        if not line.isascii() or not line.isdigit() or int(line) >= num_images:
            raise CaptionMapError(path, i + 1, f"{line[:40]!r} is not an image index in [0, {num_images}) "
                                               f"({features_file} has {num_images} images)")
        out[i] = int(line)
    counts = np.bincount(out, minlength=num_images)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise CaptionMapError(path, None, f"images without any caption: {missing[:5].tolist()} "
                                          f"({len(missing)} of {num_images})")
    return out


def load_split(
    root: "str | os.PathLike[str]",
    split: str,
    limit_captions: Optional[int] = None,
    check_finite: bool = True,
    validate: bool = False,
) -> PrecompSplit:
    """Open a precomp split. `split` is a file prefix (train, dev, test, testall), or "dev_5k" for the first
    5000 dev captions (COCO validation). With validate, the whole split is checked once (reads every row)."""
    if split == "dev_5k":
        split, limit_captions = "dev", COCO_DEV_CAPTIONS if limit_captions is None else limit_captions
    ds = PrecompSplit(root, split, limit_captions=limit_captions, check_finite=check_finite)
    if validate:
        ds.validate()
    return ds
