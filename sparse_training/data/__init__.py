"""Data sets: `load_data(DataConfig, device) -> Data`.

Names: mnist1d (default; generated offline, cached), cifar10, cifar100, mnist, fashion-mnist
(from --data-dir in torchvision's layout; downloaded only with --download), synthetic (tiny,
for tests), npz:PATH (a user's arrays) and imagefolder:PATH[:SIZE] (ImageNet-style folders).
See `Data` for the interface every source offers."""

from __future__ import annotations

import torch

from ..config import DataConfig
from ..errors import UserError
from .base import SPLITS, Data
from .tensors import TensorData, crop_flip

DATA_NAMES = ("mnist1d", "cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic", "npz:PATH", "imagefolder:PATH")

__all__ = ["DATA_NAMES", "SPLITS", "Data", "TensorData", "crop_flip", "load_data"]


def load_data(config: DataConfig, device: torch.device | str = "cpu") -> Data:
    from .readers import CIFAR, IDX, load_image_source
    from .sources import load_mnist1d, load_npz, load_synthetic

    device = torch.device(device)
    name = config.name
    if name == "mnist1d":
        return load_mnist1d(config, device)
    if name == "synthetic":
        return load_synthetic(config, device)
    if name in CIFAR or name in IDX:
        return load_image_source(name, config, device)
    if name.startswith("npz:") and len(name) > 4:
        return load_npz(name[4:], device)
    if name.startswith("imagefolder:") and len(name) > 12:
        from .folder import FolderData

        return FolderData(name[12:], config, device)
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATA_NAMES)}")
