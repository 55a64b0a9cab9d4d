"""Image files: listing a folder, opening one for tvrn with a pixel limit, reading one as RGB.

`list_images(folder)`: every .jpg / .jpeg / .png / .webp file (any case), recursively, as paths relative to
the folder with "/" separators, sorted, so a listing is the same on every run and machine.

`open_image(src, max_pixels)`: the one place tvrn opens an image file (the extractor, photo queries). It reads
the header first (PIL's `Image.open` is lazy: the size without decoding), then, for an image of more than
`max_pixels` pixels (width x height; default `MAX_PIXELS` = 40,000,000, overridable by the caller and by
`tvrn extract --max-pixels N`):

- a JPEG is decoded reduced, by libjpeg's DCT scaling (`draft`) at 1/2, 1/4 or 1/8, the largest of those
  that fits the limit: cheap, only the reduced pixels are ever in memory. The features are computed at a
  fixed input size (`Recipe.input_size`, 384 or 224 pixels a side, the image resized to it anyway), so a
  reduced decode still larger than that loses nothing the extractor uses;
- any other format (PNG, WebP: no reduced decode, PIL's `reduce` needs the full decode first), or a JPEG
  still above the limit at 1/8, is refused with `ImageTooLargeError` (an `ImageReadError`, a ValueError)
  naming the file, its size in pixels and the limit, before anything is decoded.

PIL's own guard (`Image.MAX_IMAGE_PIXELS`, a `DecompressionBombError` above twice it, about 179 million
pixels) never escapes: such a file is opened without PIL's check and tvrn's limit decides, as above.
Memory of a read is then bounded by about 7 bytes per decoded pixel (PIL's 4 bytes a pixel plus the
3-byte array), 280 MB at the default limit, whatever the file claims (PIL warns, DecompressionBombWarning,
above its MAX_IMAGE_PIXELS: tvrn's limit decides).

`read_rgb(path, max_pixels)`: open as above, apply the EXIF orientation, convert grey, palette, CMYK, RGBA
(composited on white), 16-bit and the rest to RGB -> (H, W, 3) uint8. An unreadable file raises
`ImageReadError` naming it. `read_image` returns the same with the full-size (width, height) of the oriented
image, which differs from the array's size when the image was decoded reduced.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import IO, Optional, Union

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_PIXELS = 40_000_000  # default pixel limit (width x height) of an image tvrn decodes; see the module doc
_REDUCED_FORMATS = ("JPEG", "MPO")  # formats with a reduced decode (libjpeg's DCT scaling)

Source = Union[str, os.PathLike, bytes, bytearray, IO[bytes]]


class ImageReadError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"cannot read image {self.path}: {problem}")


class ImageTooLargeError(ImageReadError):
    """An image of more pixels than the limit that cannot be decoded reduced below it (see the module doc).
    width, height: the file's size (None when unknown); pixels: width x height; limit: the max_pixels used."""

    def __init__(self, path: str | os.PathLike, width: Optional[int], height: Optional[int], limit: int,
                 pixels: Optional[int] = None, detail: str = ""):
        self.width, self.height, self.limit = width, height, int(limit)
        self.pixels = pixels if pixels is not None else (width or 0) * (height or 0)
        size = f"{width} x {height} = {self.pixels} pixels" if width is not None else f"{self.pixels} pixels"
        super().__init__(path, f"image too large: {size}, above the limit of {self.limit} pixels{detail}")


def list_images(folder: str | os.PathLike) -> list[str]:
    """Relative paths ("a/b.JPG") of the image files under folder, sorted; hidden files and folders skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def image_id(rel_path: str) -> str:
    """The id written to SPLIT_ids.txt: the relative path without its extension ("a/b.JPG" -> "a/b")."""
    return rel_path.rsplit(".", 1)[0]


def _source_name(src, name) -> str:
    if name is not None:
        return str(name)
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or "the uploaded file")


def _open_past_pil_limit(fp: IO[bytes]):
    """What `Image.open` does, without its decompression-bomb check (it raised before tvrn could see the
    size): the first registered format whose plugin accepts the file -> the lazy image, or None."""
    from PIL import Image

    Image.init()
    fp.seek(0)
    prefix = fp.read(16)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        ok = not accept or accept(prefix)
        if not ok or isinstance(ok, str):
            continue
        try:
            fp.seek(0)
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    return None


def _reduction(width: int, height: int, max_pixels: int) -> Optional[int]:
    """The smallest JPEG scale divisor (2, 4, 8) that brings the image within max_pixels, or None."""
    for d in (2, 4, 8):
        if -(-width // d) * -(-height // d) <= max_pixels:
            return d
    return None


def open_image(src: Source, max_pixels: Optional[int] = None, name: Optional[str] = None):
    """Open and decode an image for tvrn within a pixel limit (see the module doc).

    src: a path, bytes or a binary file object; max_pixels: the limit (None: `MAX_PIXELS`); name: how errors
    name the file (default: the path, or "the uploaded file").
    -> (PIL image, decoded, possibly reduced, file closed; (width, height) of the file at full size, before
    the EXIF orientation). Raises ImageTooLargeError above the limit (see the module doc), ImageReadError for
    a file PIL cannot read, FileNotFoundError for a missing path.
    """
    from PIL import Image, UnidentifiedImageError

    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if limit < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels!r}")
    label = _source_name(src, name)
    own = isinstance(src, (str, os.PathLike))
    if own:
        fp = open(src, "rb")  # FileNotFoundError propagates
    elif isinstance(src, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(src)
    else:
        fp = src
        if not (hasattr(fp, "seekable") and fp.seekable()):
            fp = io.BytesIO(fp.read())
    try:
        try:
            im = Image.open(fp)  # the header only
        except Image.DecompressionBombError as e:  # above twice PIL's MAX_IMAGE_PIXELS: tvrn's limit decides
            im = _open_past_pil_limit(fp)
            if im is None:
                raise ImageTooLargeError(label, None, None, limit, detail=f" ({e})") from None
        full = tuple(int(v) for v in im.size)
        w, h = full
        if w * h > limit:
            d = _reduction(w, h, limit) if im.format in _REDUCED_FORMATS else None
            if d is not None:
                im.draft(im.mode, (max(1, w // d), max(1, h // d)))
            if im.size[0] * im.size[1] > limit:  # not a JPEG, or still too large at 1/8, or no draft possible
                how = "" if im.format in _REDUCED_FORMATS else f"; a {im.format} file is not decoded reduced"
                raise ImageTooLargeError(label, w, h, limit, detail=how)
        im.load()  # decode now: a truncated file fails here, not later
        return im, full
    except (ImageTooLargeError, FileNotFoundError):
        raise
    except Image.DecompressionBombError as e:  # from a plugin's own check (frames, tiles)
        raise ImageTooLargeError(label, None, None, limit, detail=f" ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as e:  # broken files
        raise ImageReadError(label, f"{type(e).__name__}: {e}") from None
    finally:
        if own or fp is not src:
            fp.close()


def read_image(src: Source, max_pixels: Optional[int] = None, name: Optional[str] = None
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file -> ((H, W, 3) uint8 RGB, EXIF orientation applied; (width, height) of the oriented image
    at full size: (W, H) unless the image was decoded reduced). See `open_image` for the arguments."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    im, full = open_image(src, max_pixels, name)
    label = _source_name(src, name)
    try:
        before = im.size
        ImageOps.exif_transpose(im, in_place=True)  # no copy of an upright image
        if im.size != before and im.size == before[::-1]:
            full = full[::-1]
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
            arr = np.asarray(im)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            grey = np.empty(arr.shape, dtype=np.uint8)
            for i in range(0, arr.shape[0], 512):  # in row blocks: no float64 copy of the whole image
                grey[i:i + 512] = np.clip(arr[i:i + 512].astype(np.float64) / top * 255.0 + 0.5, 0, 255)
            del arr
            im = Image.fromarray(grey)
        if im.mode != "RGB":
            im = im.convert("RGB")
        rgb = np.asarray(im, dtype=np.uint8)  # no convert("RGB") copy of an RGB image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
        raise ImageReadError(label, f"{type(e).__name__}: {e}") from None
    finally:
        im.close()
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(label, f"empty image {rgb.shape}")
    return rgb, (int(full[0]), int(full[1]))


def read_rgb(path: Source, max_pixels: Optional[int] = None, name: Optional[str] = None) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, EXIF orientation applied (H, W after rotation); decoded within
    max_pixels (None: `MAX_PIXELS`) as `open_image` says: reduced (JPEG) or refused with ImageTooLargeError."""
    return read_image(path, max_pixels, name)[0]
