"""Per-image and per-caption work of a gallery: the model's encoders over batches, in eval mode, without gradients.

    enc_i = encode_images(model, image_batches)   # EncodedImages (N_img items)
    enc_t = encode_texts(model, text_batches)     # EncodedTexts (N_caps items)
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..tensors import cat_fields


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class eval_mode:
    """Put a module in eval mode for the duration of a block, restoring its previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _encode(fn, batches: Iterable[Any], device, out_device, autocast_dtype, progress, desc) -> Any:
    outs = []
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, file=sys.stderr, unit="batch")
    with torch.no_grad(), autocast(device, autocast_dtype):
        for batch in it:
            enc = fn(batch.to(device))
            outs.append(enc.to(out_device) if out_device is not None else enc)
    return cat_fields(outs)


def encode_images(
    model: nn.Module,
    image_batches: Iterable[Any],
    device: Optional[torch.device | str] = None,
    out_device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Any:
    """Run model.encode_image over ImageBatches in order (eval mode, no grad) -> one EncodedImages (N_img items).

    device: where to compute (default: the model's device); out_device: where to keep the result (default: the
    compute device; "cpu" for galleries larger than accelerator memory).
    """
    device = torch.device(device) if device is not None else model_device(model)
    with eval_mode(model):
        return _encode(model.encode_image, image_batches, device, out_device, autocast_dtype, progress, "images")


def encode_texts(
    model: nn.Module,
    text_batches: Iterable[Any],
    device: Optional[torch.device | str] = None,
    out_device: Optional[torch.device | str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> Any:
    """Run model.encode_text over TextBatches in order (eval mode, no grad) -> one EncodedTexts (N_caps items)."""
    device = torch.device(device) if device is not None else model_device(model)
    with eval_mode(model):
        return _encode(model.encode_text, text_batches, device, out_device, autocast_dtype, progress, "captions")
