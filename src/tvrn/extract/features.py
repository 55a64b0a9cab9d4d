"""Region features of an image: backbone feature map, R boxes, RoIAlign, mean over the bins.

    extractor = RegionExtractor(Recipe())                # EfficientNet-Lite0, 384 x 384 input, 30 grid boxes
    feats, boxes, size = extractor.extract(read_rgb("photo.jpg"))   # (R, 1280), (R, 4) pixels, (2,) w, h

One image: resized (bicubic, aspect not kept) to S x S, scaled to the backbone's input range, its feature map
(C, S/32, S/32); each pixel box (x1, y1, x2, y2) is mapped to map coordinates by (S / W / 32, S / H / 32) and
pooled by RoIAlign into P x P bins, averaged -> a C-d region feature. The whole-image box (always region 0)
with P dividing the map size gives exactly the global average of the map (the backbone's own pooled feature).

The `Recipe` is everything that decides the numbers; `RegionExtractor.describe()` adds the weights' sha256
and is what a manifest records, so features of two recipes are never mixed.

`prepare_file(path)` reads a file within the extractor's pixel limit (`max_pixels`, default
`images.MAX_PIXELS`): a larger JPEG is decoded reduced (1/2, 1/4, 1/8), other formats are refused with
`ImageTooLargeError` (see `tvrn.extract.images`). The backbone sees S x S pixels whatever the decoded size, so
a reduced decode still at least S a side loses nothing it uses; the boxes and the size it returns are in pixels
of the full-size image, as for an image decoded whole.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from .backbone import create_backbone
from .regions import DEFAULT_GRID, grid_boxes, roi_align, selective_search_boxes

REGION_METHODS = ("grid", "selective_search")


@dataclass(frozen=True)
class Recipe:
    backbone: str = "efficientnet-lite0"
    regions: str = "grid"  # "grid": fixed multi-scale cells; "selective_search": OpenCV proposals
    grid: tuple = DEFAULT_GRID  # grid levels (n x n cells each); R = sum(n^2) for "grid"
    num_regions: Optional[int] = None  # R; for "grid" it must equal sum(n^2) (None: that)
    input_size: int = 384  # S: the backbone sees S x S (a multiple of 32); the map is S/32 on a side
    pool_bins: int = 2  # P: RoIAlign bins per side, averaged into one vector per region

    def __post_init__(self):
        if self.regions not in REGION_METHODS:
            raise ValueError(f"unknown region method {self.regions!r}, expected one of {REGION_METHODS}")
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        n_grid = sum(g * g for g in self.grid)
        if self.num_regions is None:
            object.__setattr__(self, "num_regions", n_grid if self.regions == "grid" else 36)
        if self.regions == "grid" and self.num_regions != n_grid:
            raise ValueError(f"a grid of levels {list(self.grid)} has {n_grid} boxes, not {self.num_regions}")
        if self.input_size % 32 or self.input_size < 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {self.input_size}")
        if self.num_regions < 1 or self.pool_bins < 1:
            raise ValueError("num_regions and pool_bins must be positive")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d


class RegionExtractor:
    """Backbone + region recipe. `prepare` (CPU, per image, thread-safe) then `features` (batched)."""

    def __init__(self, recipe: Recipe = Recipe(), weights: Optional[str] = None, device=None,
                 max_pixels: Optional[int] = None):
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise ValueError(f"max_pixels must be an integer of at least 1, got {max_pixels!r}")
        self.recipe = recipe
        self.max_pixels = max_pixels  # pixel limit of the images it reads (None: images.MAX_PIXELS)
        self.backbone = create_backbone(recipe.backbone, weights).to(device or "cpu")
        self.device = device or "cpu"

    def describe(self) -> dict:
        """The manifest's record of this extractor: recipe, backbone (weights file and sha256), R, Dv."""
        return {"recipe": self.recipe.to_dict(), "backbone": self.backbone.describe(),
                "num_regions": self.recipe.num_regions, "feature_size": self.backbone.channels,
                "pooling": "RoIAlign (aligned, adaptive sampling) into pool_bins^2 bins, mean"}

    def boxes(self, rgb: np.ndarray) -> np.ndarray:
        """rgb (H, W, 3) uint8 -> (R, 4) float32 pixel boxes, region 0 the whole image."""
        h, w = rgb.shape[:2]
        if self.recipe.regions == "grid":
            return grid_boxes(w, h, self.recipe.grid)
        return selective_search_boxes(rgb, self.recipe.num_regions)

    def prepare(self, rgb: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """rgb (H, W, 3) uint8 -> (input (3, S, S) float32, boxes (R, 4) float32 pixels, size (2,) w, h)."""
        from PIL import Image

        h, w = rgb.shape[:2]
        s = self.recipe.input_size
        resized = np.asarray(Image.fromarray(rgb).resize((s, s), Image.BICUBIC), dtype=np.uint8)
        return self.backbone.preprocess(resized), self.boxes(rgb), np.array([w, h], dtype=np.float32)

    def prepare_file(self, path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """An image file -> `prepare`'s (input, boxes, size), read within `max_pixels` (see the module doc);
        boxes and size in pixels of the full-size oriented image even when it was decoded reduced."""
        from .images import read_image

        rgb, (fw, fh) = read_image(path, self.max_pixels)
        x, boxes, size = self.prepare(rgb)
        h, w = rgb.shape[:2]
        del rgb
        if (fw, fh) != (w, h):  # decoded reduced: back to the file's pixels (RoIAlign only sees box / size)
            boxes = (boxes * np.array([fw / w, fh / h, fw / w, fh / h], dtype=np.float64)).astype(np.float32)
            size = np.array([fw, fh], dtype=np.float32)
        return x, boxes, size

    @torch.no_grad()
    def features(self, inputs: torch.Tensor, boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """inputs (B, 3, S, S), boxes (B, R, 4) pixels, sizes (B, 2) w, h -> (B, R, C) float32 region features."""
        fmap = self.backbone(inputs.to(self.device)).float().cpu()  # (B, C, S/32, S/32)
        hm, wm = fmap.shape[2:]
        scale = np.stack([wm / sizes[:, 0], hm / sizes[:, 1]], 1)  # (B, 2) map cells per pixel, x and y
        fboxes = torch.from_numpy(boxes * np.tile(scale, 2)[:, None, :]).float()  # (B, R, 4) map coordinates
        pooled = roi_align(fmap, fboxes, self.recipe.pool_bins)  # (B, R, C, P, P)
        return pooled.mean(dim=(3, 4)).numpy().astype(np.float32)  # (B, R, C)

    def extract(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image -> (features (R, C) float32, boxes (R, 4) pixels, size (2,) w, h)."""
        x, b, s = self.prepare(rgb)
        return self.features(x[None], b[None], s[None])[0], b, s


def same_recipe(a: dict, b: dict) -> bool:
    """Whether two `describe()` records would give the same features (recipe and weights' sha256)."""
    return a.get("recipe") == b.get("recipe") and \
        a.get("backbone", {}).get("weights_sha256") == b.get("backbone", {}).get("weights_sha256")


def recipe_difference(a: dict, b: dict) -> list[str]:
    """What differs between two `describe()` records, as 'key: a != b' strings."""
    out = [f"{k}: {a['recipe'].get(k)!r} != {b['recipe'].get(k)!r}"
           for k in sorted(set(a.get("recipe", {})) | set(b.get("recipe", {})))
           if a.get("recipe", {}).get(k) != b.get("recipe", {}).get(k)]
    wa, wb = a.get("backbone", {}).get("weights_sha256"), b.get("backbone", {}).get("weights_sha256")
    if wa != wb:
        out.append(f"weights sha256: {str(wa)[:12]}... != {str(wb)[:12]}...")
    return out
