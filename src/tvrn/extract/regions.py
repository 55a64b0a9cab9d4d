"""Region boxes and box pooling.

Boxes are (R, 4) x1, y1, x2, y2 in pixels of the (EXIF-oriented) image, the precomp layout's convention.

- `grid_boxes(w, h, levels)`: a fixed multi-scale grid, level n cuts the image into n x n cells; levels (1, 2,
  3, 4) give R = 1 + 4 + 9 + 16 = 30 boxes, the whole image first. Fast, the same for every image.
- `selective_search_boxes(rgb, r)`: object-like proposals from OpenCV's contrib package (selective search, the
  proposal method of the original R-CNN), the whole image first, then proposals largest first after dropping
  tiny and near-duplicate ones (IoU > 0.7 with a kept box), topped up with grid boxes when too few remain.
- `roi_align(features, boxes, output_size)`: RoIAlign (Mask R-CNN) in plain torch, the semantics of
  `torchvision.ops.roi_align(..., spatial_scale=1, sampling_ratio=-1, aligned=True)`: boxes in feature-map
  coordinates, each of output_size x output_size bins averages ceil(box size / output_size) bilinear samples
  per axis at a regular grid, a sample outside the map by more than a cell counts as 0.
  (torchvision's CPU kernel needs a torchvision build that matches torch; the CPU torch here has none.)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

DEFAULT_GRID = (1, 2, 3, 4)


def grid_boxes(width: int, height: int, levels: Sequence[int] = DEFAULT_GRID) -> np.ndarray:
    """-> (R, 4) float32 pixel boxes, R = sum(n * n for n in levels); level n: n x n cells, row by row."""
    out = []
    for n in levels:
        if n < 1:
            raise ValueError(f"grid levels must be positive, got {list(levels)}")
        xs, ys = np.linspace(0, width, n + 1), np.linspace(0, height, n + 1)
        for i in range(n):
            for j in range(n):
                out.append((xs[j], ys[i], xs[j + 1], ys[i + 1]))
    return np.asarray(out, dtype=np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) -> (N, M) intersection over union."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def selective_search_available() -> bool:
    try:
        import cv2

        return hasattr(cv2, "ximgproc")
    except ImportError:
        return False


def selective_search_boxes(rgb: np.ndarray, num_regions: int, max_side: int = 256, min_area: float = 0.01,
                           max_iou: float = 0.7) -> np.ndarray:
    """rgb (H, W, 3) uint8 -> (num_regions, 4) float32 pixel boxes: the whole image, then selective-search
    proposals (fast mode, on a copy resized to at most max_side pixels) covering at least min_area of the image
    and overlapping every kept box by IoU <= max_iou, then grid boxes if fewer than num_regions were found."""
    import cv2

    h, w = rgb.shape[:2]
    s = min(1.0, max_side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) if s < 1 else rgb
    cv2.setNumThreads(1)  # one thread: the same proposals on every run
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV wants BGR
    ss.switchToSelectiveSearchFast()
    rects = np.unique(np.asarray(ss.process()).reshape(-1, 4), axis=0)  # (n, 4) x, y, w, h, small image
    # OpenCV ranks its proposals with an unseeded random number (the set is the same on every run, the
    # order is not): order them by area, largest first, then position, so the boxes are the same every run
    rects = rects[np.lexsort((rects[:, 1], rects[:, 0], -(rects[:, 2] * rects[:, 3])))]
    sx, sy = w / small.shape[1], h / small.shape[0]
    kept = [np.array([0, 0, w, h], dtype=np.float64)]
    for x, y, bw, bh in rects:
        box = np.array([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy])
        if (box[2] - box[0]) * (box[3] - box[1]) < min_area * w * h:
            continue
        if iou(box[None], np.stack(kept)).max() > max_iou:
            continue
        kept.append(box)
        if len(kept) == num_regions:
            break
    if len(kept) < num_regions:  # top up with grid cells, finer and finer
        level = 2
        while len(kept) < num_regions:
            for box in grid_boxes(w, h, (level,)):
                if len(kept) < num_regions:
                    kept.append(box.astype(np.float64))
            level += 1
    return np.asarray(kept, dtype=np.float32)


def _bilinear_coords(pos: torch.Tensor, size: int):
    """Sample positions (n,) along an axis of `size` cells -> (low, high, weight_low, weight_high, valid),
    torchvision's rules: outside [-1, size] invalid, clamped at 0 and at the last cell."""
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    pos = torch.where(at_end, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    return low, high, 1 - frac, frac, valid


def roi_align(features: torch.Tensor, boxes: torch.Tensor, output_size: int = 2) -> torch.Tensor:
    """features (B, C, H, W), boxes (B, R, 4) x1, y1, x2, y2 in feature-map coordinates (pixel box times the
    map's scale on each axis) -> (B, R, C, P, P), P = output_size. See the module doc for the semantics."""
    b, c, h, w = features.shape
    p = output_size
    out = features.new_zeros(b, boxes.shape[1], c, p, p)
    for i in range(b):
        fmap = features[i]  # (C, H, W)
        for r in range(boxes.shape[1]):
            x1, y1, x2, y2 = (float(v) - 0.5 for v in boxes[i, r])  # aligned: pixel centres at .5
            rw, rh = x2 - x1, y2 - y1
            gw, gh = max(1, math.ceil(rw / p)), max(1, math.ceil(rh / p))  # samples per bin and axis
            if rw <= 0 or rh <= 0:  # torchvision: ceil(0) = 0 samples, an all-zero output
                continue
            # sample positions: bin k, sample s at start + (k + (s + .5) / g) * bin size
            ys = y1 + (torch.arange(p * gh, dtype=features.dtype) + 0.5) * (rh / (p * gh))  # (P*gh,)
            xs = x1 + (torch.arange(p * gw, dtype=features.dtype) + 0.5) * (rw / (p * gw))  # (P*gw,)
            yl, yh, wyl, wyh, vy = _bilinear_coords(ys, h)
            xl, xh, wxl, wxh, vx = _bilinear_coords(xs, w)
            rows = fmap[:, yl] * wyl[None, :, None] + fmap[:, yh] * wyh[None, :, None]  # (C, P*gh, W)
            vals = rows[:, :, xl] * wxl + rows[:, :, xh] * wxh  # (C, P*gh, P*gw)
            vals = vals * (vy[:, None] & vx[None, :]).to(vals.dtype)
            out[i, r] = vals.reshape(c, p, gh, p, gw).mean(dim=(2, 4))  # (C, P, P)
    return out
