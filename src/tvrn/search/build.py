"""Building a search index from a trained model and a data split: loading the model (a checkpoint, a model
folder or a hub name) with the slim checkpoint an index stores, the checks that it fits the gallery, and the
two ways to encode the gallery: in RAM (`build_in_memory`, `SearchIndex.build`) or straight into an index
folder one batch at a time (`build_folder`, `SearchIndex.build_to`). A FAISS factory string is checked before
anything is encoded (`tvrn.search.vectors.check_faiss`).

The index is made with the class it is given (`build_in_memory(SearchIndex, ...)`): this module does not
import `tvrn.search.index`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..data import load_split
from .errors import SearchIndexError
from .formats import _IndexWriter
from .vectors import _train_count, check_faiss


def check_model_recipe(checkpoint_path, data_root) -> None:
    """Refuse (SearchIndexError) to index a gallery whose features `tvrn extract` made with another recipe than
    the data the model was trained on (its checkpoint's or run.json's data.root), when both folders record their
    recipe: the model has not learned features made that way, so its text and photo answers would be noise.
    Nothing is refused when either recipe is unknown (features not made by `tvrn extract`)."""
    from ..extract.features import recipe_difference, same_recipe
    from ..extract.folder import MANIFEST
    from ..checkpoint.folder import manifest_extractor
    from .image_query import model_extractor

    gallery = manifest_extractor(data_root)
    if gallery is None:
        return
    train_root, model_data = model_extractor(checkpoint_path)
    if model_data is None or same_recipe(gallery, model_data):
        return

    def recipe(rec: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in (rec.get("recipe") or {}).items())

    raise SearchIndexError(
        f"checkpoint {checkpoint_path} was trained on features of another extraction recipe than the gallery's: "
        f"model data {Path(train_root) / MANIFEST} ({recipe(model_data)}) vs gallery {Path(data_root) / MANIFEST} "
        f"({recipe(gallery)}); differences: {'; '.join(recipe_difference(model_data, gallery))}. Index data "
        f"extracted with the model's recipe (tvrn extract with the same options), or train a model on this data")


def _load_model(checkpoint_path, device):
    """(model in eval mode, tokenizer, the slim checkpoint an index stores: config, weights, vocabulary)."""
    from ..checkpoint import load_portable

    model, tokenizer, _, slim = load_portable(checkpoint_path)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, slim


def _ids(data) -> list[str]:
    return list(data.ids) if data.ids is not None else [str(i) for i in range(data.num_images)]


def _image_dir(data_root, split, image_dir) -> Optional[str]:
    if image_dir is None and (Path(data_root) / "images" / split).is_dir():
        image_dir = Path(data_root) / "images" / split
    if image_dir is None:  # a `tvrn extract` data folder records the photo folder of each split
        try:
            image_dir = json.loads((Path(data_root) / "manifest.json").read_text())["splits"][split].get("image_dir")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            image_dir = None
        if image_dir is not None and not Path(image_dir).is_dir():
            image_dir = None
    return None if image_dir is None else str(Path(image_dir).resolve())


def build_in_memory(cls, checkpoint_path: str | os.PathLike, data_root: str | os.PathLike, split: str = "test",
                    image_dir: Optional[str | os.PathLike] = None, batch_size: int = 128,
                    adjacency_threshold: float = 0.2, device=None, progress: bool = False):
    """Encode every image and caption of a precomp split with a trained checkpoint, in RAM -> cls(...) (a
    SearchIndex); see `SearchIndex.build`."""
    from ..checkpoint import check_model_fits_split
    from ..evaluation import encode_split

    check_model_recipe(checkpoint_path, data_root)
    model, tokenizer, slim = _load_model(checkpoint_path, device)
    data = load_split(data_root, split)
    check_model_fits_split(model, data, checkpoint_path)
    enc_i, enc_t = encode_split(model, data, tokenizer, {"eval_batch_size": batch_size,
                                                          "adjacency_threshold": adjacency_threshold},
                                device=device, progress=progress)
    return cls(model, tokenizer, slim, enc_i.to("cpu"), enc_t.to("cpu"), _ids(data), list(data.captions),
               torch.as_tensor(data.caption_to_image), data_root=str(data_root), split=split,
               image_dir=_image_dir(data_root, split, image_dir))


def build_folder(out: str | os.PathLike, checkpoint_path: str | os.PathLike, data_root: str | os.PathLike,
                 split: str = "test", image_dir=None, batch_size: int = 128, adjacency_threshold: float = 0.2,
                 dtype: str = "float32", faiss: Optional[str] = None, device=None, progress: bool = False,
                 on_batch=None) -> None:
    """Encode a split straight into an index folder at `out`, one batch at a time (memory flat in the gallery
    size); see `SearchIndex.build_to`, which then opens it. on_batch(what, rows done): called after each batch
    ("images", then "captions")."""
    from ..data import iter_image_batches, iter_text_batches
    from ..checkpoint import check_model_fits_split
    from .image_query import extract_record

    data = load_split(data_root, split)
    if faiss is not None:  # before any encoding: a bad factory string costs nothing
        check_faiss(faiss, *_train_count(data.num_images, data.num_captions))
    check_model_recipe(checkpoint_path, data_root)
    model, tokenizer, slim = _load_model(checkpoint_path, device)
    check_model_fits_split(model, data, checkpoint_path)
    tokens = [tokenizer.encode(c) for c in data.captions]
    writer = _IndexWriter(out, data.num_images, data.num_captions, dtype, max_words=max(map(len, tokens)))
    try:
        with torch.no_grad():
            start = 0
            for batch in iter_image_batches(data, batch_size, adjacency_threshold=adjacency_threshold):
                enc = model.encode_image(batch.to(device) if device else batch).to("cpu")
                writer.add_images(start, enc, model.shortlist_embed_image(enc).float())
                start += len(enc)
                if on_batch:
                    on_batch("images", start)
            start = 0
            for batch in iter_text_batches(data, tokenizer, batch_size):
                enc = model.encode_text(batch.to(device) if device else batch).to("cpu")
                writer.add_texts(start, enc, model.shortlist_embed_text(enc).float())
                start += len(enc)
                if on_batch:
                    on_batch("captions", start)
        writer.finish(slim, _ids(data), list(data.captions), torch.as_tensor(data.caption_to_image),
                      str(data_root), split, _image_dir(data_root, split, image_dir), faiss,
                      extract=extract_record(checkpoint_path, data_root, adjacency_threshold))
    except BaseException:  # a failed or interrupted build leaves no temporary folder behind
        writer.abort()
        raise


__all__ = ["build_folder", "build_in_memory", "check_model_recipe"]
