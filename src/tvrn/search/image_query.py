"""Image files as queries: a photo that is not in the gallery, extracted with the gallery's recorded recipe.

An index built (`tvrn index`) from a data folder made by `tvrn extract` records in its manifest how those
features were made (`extract_record`): the data folder's extractor (backbone, weights sha256, region recipe,
input size, R), the extractor of the data the model was trained on (the data.root of the checkpoint's config
or of the run.json beside it, when that folder has a manifest), and the adjacency threshold the gallery was encoded with. `encode_image_file`
makes a query image's features the same way, so it is comparable with the gallery, and refuses when:

- the gallery's features were not made by `tvrn extract` (bottom-up features, the synthetic benchmark):
  nothing here can make features like those from a photo;
- the model was trained on features of another recipe than the gallery's (or not made by `tvrn extract`);
- the backbone's weights file here is not the one recorded (another sha256).

A query image is read as the extractor reads a gallery image (`tvrn.extract.images.open_image`), within
`MAX_IMAGE_PIXELS` (the extractor's default limit, 40 million pixels): the header is read first; a larger
JPEG is decoded reduced (1/2, 1/4, 1/8 scale), any other larger image is refused before it is decoded with
`QueryImageTooLargeError`, a SearchIndexError (a ValueError: the server answers 400 with its message).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..extract.images import MAX_PIXELS
from ..checkpoint.folder import manifest_extractor
from .errors import SearchIndexError

MAX_IMAGE_PIXELS = MAX_PIXELS  # pixel limit of a query image (larger: decoded reduced if JPEG, else refused)
_EXTRACTORS: dict = {}  # (recipe, device) -> RegionExtractor, built once per process


def extract_record(checkpoint_path, data_root, adjacency_threshold: float) -> Optional[dict]:
    """What an index records about its gallery's features, or None when they were not made by `tvrn extract`."""
    gallery = manifest_extractor(data_root)
    if gallery is None:
        return None
    train_root, model_data = model_extractor(checkpoint_path)
    return {"gallery": gallery, "model_data": model_data, "model_data_root": train_root,
            "adjacency_threshold": float(adjacency_threshold)}


def model_extractor(checkpoint_path) -> tuple[Optional[str], Optional[dict]]:
    """(the data folder the model was trained on, the `tvrn extract` record of its features) for a checkpoint
    (its data folder's manifest) or a model folder / hub name (`tvrn export` recorded both in config.json);
    either None when unknown."""
    from ..checkpoint.folder import is_model_source

    if is_model_source(checkpoint_path):
        from ..checkpoint.folder import folder_config

        features = folder_config(checkpoint_path).get("features") or {}
        return features.get("data_root"), features.get("extract")
    train_root = _training_root(checkpoint_path)
    return train_root, manifest_extractor(train_root)


def _training_root(checkpoint_path) -> Optional[str]:
    """The data folder a checkpoint was trained on: its config's data.root, else the run.json that training
    writes beside its checkpoints (RUN/run.json for RUN/best.pt), else None."""
    import json

    from ..checkpoint import load_checkpoint

    try:
        root = ((load_checkpoint(checkpoint_path).get("config") or {}).get("data") or {}).get("root")
    except Exception:
        root = None
    run = Path(checkpoint_path).parent / "run.json"
    if root is None and run.is_file():
        try:
            root = (json.loads(run.read_text()).get("data") or {}).get("root")
        except (OSError, ValueError):
            root = None
    return root


def image_query_problem(index) -> Optional[str]:
    """Why this index cannot take image files as queries, or None when it can."""
    from ..extract import same_recipe
    from ..extract.features import recipe_difference

    rec = getattr(index, "extract", None)
    if not rec:
        return ("this index's gallery features were not made by `tvrn extract` (no extraction recipe recorded), so "
                "a photo's features would not be comparable; build the index from a data folder made by "
                "`tvrn extract` to query with image files")
    if rec.get("model_data") is None:
        return (f"the model was trained on data without a `tvrn extract` manifest ({rec.get('model_data_root')!r}), "
                f"so it has not learned features made from photos this way; train it on extracted features")
    if not same_recipe(rec["gallery"], rec["model_data"]):
        return ("the model was trained on features of another extraction recipe than the gallery's ("
                + "; ".join(recipe_difference(rec["model_data"], rec["gallery"])) + ")")
    return None


def _extractor(record: dict):
    from ..extract import Recipe, RegionExtractor

    recipe = Recipe(**{k: (tuple(v) if k == "grid" else v) for k, v in record["recipe"].items()})
    key = repr(recipe)
    if key not in _EXTRACTORS:
        ex = RegionExtractor(recipe)
        want = record["backbone"]["weights_sha256"]
        if ex.backbone.weights_sha256 != want:
            raise SearchIndexError(f"the backbone weights here ({ex.backbone.weights}, sha256 "
                                   f"{ex.backbone.weights_sha256[:12]}...) are not the ones the gallery was "
                                   f"extracted with (sha256 {want[:12]}...)")
        _EXTRACTORS[key] = ex
    return _EXTRACTORS[key]


class QueryImageTooLargeError(SearchIndexError):
    """A query image above the pixel limit that cannot be decoded reduced below it: width, height, pixels,
    limit as in `tvrn.extract.images.ImageTooLargeError`."""

    def __init__(self, message: str, width, height, pixels: int, limit: int):
        self.width, self.height, self.pixels, self.limit = width, height, pixels, limit
        super().__init__(message)


def read_query_image(file, max_pixels: Optional[int] = None) -> np.ndarray:
    """A path, bytes or a binary file object -> (H, W, 3) uint8 RGB, read within max_pixels (None:
    MAX_IMAGE_PIXELS; see the module doc). SearchIndexError if it is not an image, QueryImageTooLargeError
    (a SearchIndexError) if it is too large."""
    from ..extract.images import ImageReadError, ImageTooLargeError, read_rgb

    name = str(file) if isinstance(file, (str, os.PathLike)) else "the uploaded file"
    src = io.BytesIO(file) if isinstance(file, (bytes, bytearray)) else file
    try:
        return read_rgb(src, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels, name=name)
    except ImageTooLargeError as e:
        raise QueryImageTooLargeError(f"cannot read {name} as an image: {e.problem}", e.width, e.height,
                                      e.pixels, e.limit) from None
    except ImageReadError as e:
        raise SearchIndexError(f"cannot read {name} as an image: {e.problem}") from None


def encode_image_file(index, file):
    """An image file -> the model's EncodedImages of one image, features made with the gallery's recipe.
    Raises SearchIndexError (see the module doc) when the index cannot take image files."""
    from ..data import collate_images

    problem = image_query_problem(index)
    if problem:
        raise SearchIndexError(f"image file queries refused: {problem}")
    rec = index.extract
    ex = _extractor(rec["gallery"])
    rgb = read_query_image(file)
    feats, boxes, _ = ex.extract(rgb)  # (R, Dv), (R, 4) pixels
    batch = collate_images(feats[None], boxes[None], [0], rec["adjacency_threshold"])
    with torch.no_grad():
        return index.model.encode_image(batch)
