"""CIFAR-10/100 and MNIST/Fashion-MNIST from their standard on-disk layouts, read by small
readers of our own (torchvision's classes check md5 sums, so tests could not use tiny fake
files). torchvision is used only to download, when asked, into the same layout.

CIFAR batches are pickles: they go through an unpickler that resolves only the few numpy
names an array needs, so a data file can never run code."""

from __future__ import annotations

import codecs
import gzip
import importlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from .sources import cache_dir
from .tensors import TensorData


@dataclass(frozen=True)
class ImageSource:
    title: str  # as users know it
    folder: str  # the directory torchvision downloads into, under the data dir
    torchvision_class: str
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training set in [0, 1]
    std: tuple[float, ...]
    augment: bool  # CIFAR: random crop with 4-pixel padding + horizontal flip


CIFAR = {
    "cifar10": ImageSource("CIFAR-10", "cifar-10-batches-py", "CIFAR10", 10,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ImageSource("CIFAR-100", "cifar-100-python", "CIFAR100", 100,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}
IDX = {
    "mnist": ImageSource("MNIST", "MNIST", "MNIST", 10, (0.1307,), (0.3081,), False),
    "fashion-mnist": ImageSource("Fashion-MNIST", "FashionMNIST", "FashionMNIST", 10, (0.2860,), (0.3530,), False),
}
CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": (["train"], ["test"], "fine_labels"),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_image_source(name: str, config: DataConfig, device: torch.device) -> TensorData:
    source = CIFAR.get(name) or IDX[name]
    root = cache_dir(config)
    read = read_cifar if name in CIFAR else read_idx_source
    arrays = read(name, root)
    if arrays is None and config.download:
        download(source, root)
        arrays = read(name, root)
    if arrays is None:
        layout = source.folder if name in CIFAR else f"{source.folder}/raw/{IDX_FILES['train'][0]}[.gz] and the other IDX files"
        raise UserError(f"{source.title} not found under {root}; pass --data-dir DIR holding {layout}, or add --download")
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in arrays)
    return TensorData(name, x_train, y_train, x_test, y_test, source.num_classes, device, scale=255.0,
                      mean=source.mean, std=source.std, crop_padding=4 if source.augment else 0,
                      flip=source.augment, augment=config.augment)


def download(source: ImageSource, root: Path) -> None:
    from torchvision import datasets

    try:
        for train in (True, False):
            getattr(datasets, source.torchvision_class)(str(root), train=train, download=True)
    except Exception as error:  # noqa: BLE001 - network and archive errors alike
        raise UserError(f"downloading {source.title} into {root} failed ({error}); "
                        f"fetch it by hand into {root / source.folder}") from None


# ---------------------------------------------------------------- CIFAR pickles

def _numpy_module(name: str) -> Any:
    try:
        return importlib.import_module(f"numpy._core.{name}")  # numpy >= 2 (and its 1.26 shim)
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled numpy array needs, under numpy 1 and numpy 2 module names,
    and `_codecs.encode`, with which Python 3 writes bytes into protocol-2 pickles."""
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        with open(path, "rb") as handle:
            raw = NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise UserError(f"{path} is not a CIFAR batch file ({error})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR batch file (it holds a {type(raw).__name__}, not a dict)")
    entries = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    if "data" not in entries or label_key not in entries:
        raise UserError(f"{path} is not a CIFAR batch file (no 'data' or '{label_key}' entry)")
    data, labels = np.asarray(entries["data"]), np.asarray(entries[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise UserError(f"{path} is not a CIFAR batch file (data {data.dtype} {data.shape}, labels {labels.shape})")
    if labels.dtype.kind not in "iu" or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise UserError(f"{path} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(name: str, root: Path) -> tuple[np.ndarray, ...] | None:
    """(x_train, y_train, x_test, y_test), or None when a batch file is missing."""
    train_files, test_files, label_key = CIFAR_FILES[name]
    folder = root / CIFAR[name].folder
    paths = [[folder / f for f in files] for files in (train_files, test_files)]
    if not all(p.is_file() for group in paths for p in group):
        return None
    splits = []
    for group in paths:
        batches = [read_cifar_batch(p, label_key, CIFAR[name].num_classes) for p in group]
        splits += [np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])]
    return tuple(splits)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format), gzip-compressed or not."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise UserError(f"{path} is a damaged gzip file ({error})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated (incomplete IDX header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    if len(data) - header != int(np.prod(dims)) * dtype.itemsize:
        raise UserError(f"{path} is truncated or damaged: the header says {dims}, the file holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def find_idx_files(folder: str, root: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files under root/FOLDER/raw (torchvision's layout), root/FOLDER or root,
    each plain or .gz; None when no candidate directory holds all four."""
    for directory in (root / folder / "raw", root / folder, root):
        found = {}
        for split, names in IDX_FILES.items():
            paths = [next((p for p in (directory / n, directory / f"{n}.gz") if p.is_file()), None) for n in names]
            if None in paths:
                break
            found[split] = tuple(paths)
        else:
            return found
    return None


def read_idx_source(name: str, root: Path) -> tuple[np.ndarray, ...] | None:
    files = find_idx_files(IDX[name].folder, root)
    if files is None:
        return None
    arrays = []
    for split, (image_path, label_path) in files.items():
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"{image_path} and {label_path} do not form an image set "
                            f"(images {images.dtype} {images.shape}, labels {labels.shape})")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= IDX[name].num_classes:
            raise UserError(f"{label_path} has labels outside 0..{IDX[name].num_classes - 1}")
        arrays += [images[:, None].copy(), labels.astype(np.int64)]
    return tuple(arrays)
