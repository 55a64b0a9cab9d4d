"""Image files: listing a folder, reading one as RGB.

`list_images(folder)`: every .jpg / .jpeg / .png / .webp file (any case), recursively, as paths relative to
the folder with "/" separators, sorted, so a listing is the same on every run and machine.
`read_rgb(path)`: decode fully, apply the EXIF orientation, convert grey, palette, CMYK, RGBA (composited on
white), 16-bit and the rest to RGB -> (H, W, 3) uint8. An unreadable file raises `ImageReadError` naming it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"cannot read image {self.path}: {problem}")


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


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, EXIF orientation applied (H, W after rotation)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(path, f"empty image {rgb.shape}")
    return rgb
