"""Checkpoints and model folders -> models: the one place that turns a saved model into a model and its
tokenizer, used by evaluation, search, export and `tvrn.load`.

    model, tokenizer, config = load_trained("runs/tvrn/best.pt")   # or a model folder, or "hf-hub:ORG/NAME"
    model, tokenizer = load_model("models/tvrn-synth", device="cuda")

Modules: `file` (checkpoint files: atomic torch.save with a weights digest, safe loading), `folder` (model folders
written by `tvrn export`, hub names, the image-input records).
"""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from .file import CheckpointError, atomic_save, load_checkpoint, save_model, state_digest
from .folder import MissingExtraError, ModelFolderError, is_model_source, load_folder, trained_config
from .tokenizer import build_tokenizer


def model_from_checkpoint(ckpt: dict, source: str = "<checkpoint>"):
    """A checkpoint dict (config.model_name, config.model, model state dict, optional vocab) -> (model in eval
    mode, tokenizer). source names the file in errors."""
    from ..data import Vocabulary
    from ..models import create_model

    config = ckpt.get("config") or {}
    if not config.get("model_name") or not config.get("model"):
        raise ValueError(f"checkpoint {source} has no model config (config.model_name / config.model)")
    model = create_model(config["model_name"], **config["model"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    vocab = Vocabulary.from_json_dict(ckpt["vocab"], source=source) if ckpt.get("vocab") else None
    return model, build_tokenizer(model.config, vocab)


def _load(path, map_location):
    """-> (model, tokenizer, checkpoint config dict, the checkpoint dict, or None for a folder / hub name)."""
    if is_model_source(path):  # the one place a folder is read where a checkpoint is: every command takes both
        model, tokenizer, folder_cfg = load_folder(path)
        return model, tokenizer, trained_config(folder_cfg), None
    ckpt = load_checkpoint(path, map_location)
    model, tokenizer = model_from_checkpoint(ckpt, source=str(path))
    return model, tokenizer, ckpt.get("config") or {}, ckpt


def load_trained(path: str | os.PathLike, map_location="cpu"):
    """A checkpoint written by training (or `tvrn convert`), a model folder written by `tvrn export` or an
    `hf-hub:ORG/NAME` name -> (model in eval mode, tokenizer, checkpoint config dict)."""
    return _load(path, map_location)[:3]


def load_portable(path: str | os.PathLike, map_location="cpu"):
    """`load_trained`, plus the model as a self-contained checkpoint dict {"config": {model_name, model},
    "model": state dict, "vocab": vocabulary or None} (what a search index stores beside its gallery): a
    checkpoint's tensors as stored, a folder's as loaded -> (model, tokenizer, checkpoint config dict, portable)."""
    model, tokenizer, cfg, ckpt = _load(path, map_location)
    if ckpt is not None:
        state, vocab = ckpt["model"], ckpt.get("vocab")
    else:
        state = dict(model.state_dict())
        vocab = tokenizer.to_json_dict() if hasattr(tokenizer, "to_json_dict") else None
    portable = {"config": {k: cfg.get(k) for k in ("model_name", "model")}, "model": state, "vocab": vocab}
    return model, tokenizer, cfg, portable


def load_model(source, device=None, verify: bool = True, bert_path: Optional[str] = None):
    """A model folder (`tvrn export`), an `hf-hub:ORG/NAME` name or a checkpoint (.pt) -> (model in eval mode,
    tokenizer). device: where to put the model (default CPU). verify: check the folder's sha256 records;
    bert_path: another location of a BERT model's encoder."""
    if is_model_source(source):
        model, tokenizer, _ = load_folder(source, verify=verify, bert_path=bert_path)
    else:
        model, tokenizer, _ = load_trained(source)
    return (model.to(device) if device is not None else model), tokenizer


def check_model_fits_split(model: nn.Module, split, checkpoint: str | os.PathLike = "<checkpoint>") -> None:
    """Refuse, before anything is encoded, a model whose image input does not fit the split's features
    (ValueError naming the checkpoint, the features file and both sizes): model.img_dim against the features'
    size Dv, and, for SGRAF's BatchNorm image pooling (image_pool_norm="batch", fixed token slots), the slots
    against the tokens the split gives (2 x R with module 1, unify, on: [V; M]; else R). `tvrn eval` and
    `tvrn index` call it."""
    cfg = getattr(model, "config", None)
    img_dim = getattr(cfg, "img_dim", None)
    file = getattr(split, "features_file", f"split {getattr(split, 'split', '?')!r}")
    if img_dim is not None and int(img_dim) != split.feature_size:
        raise ValueError(f"checkpoint {checkpoint} takes image features of size {img_dim} (model.img_dim), but "
                         f"{file} has features of size {split.feature_size} ({split.num_regions} regions x "
                         f"{split.feature_size}): the model was trained on data of another feature extraction; use "
                         f"it with data of size {img_dim}, or train a model on this data")
    if getattr(cfg, "image_pool_norm", None) == "batch":
        regions = split.num_regions
        unify = bool(getattr(cfg, "unify", False))
        tokens = 2 * regions if unify else regions
        if int(cfg.image_pool_tokens) != tokens:
            how = f"2 x {regions} regions with module 1 (unify) on" if unify else f"{regions} regions"
            raise ValueError(f"checkpoint {checkpoint} pools images with BatchNorm over {cfg.image_pool_tokens} "
                             f"token slots (model.image_pool_norm=batch, image_pool_tokens={cfg.image_pool_tokens}), "
                             f"but {file} has {regions} regions per image, which give {tokens} tokens ({how}): the "
                             f"model was trained on data with another region count; use it with data of "
                             f"{cfg.image_pool_tokens // 2 if unify else cfg.image_pool_tokens} regions")


__all__ = ["CheckpointError", "ModelFolderError", "MissingExtraError", "atomic_save", "save_model",
           "load_checkpoint", "state_digest", "build_tokenizer", "model_from_checkpoint", "load_trained",
           "load_portable", "load_model", "check_model_fits_split"]
