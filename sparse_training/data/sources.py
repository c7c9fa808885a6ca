"""Sources generated or read from one file: MNIST-1D (generated offline, cached), npz
arrays a user brings, and the synthetic set for tests."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path
from ..config import DataConfig
from ..errors import UserError
from .base import seeded_generator
from .tensors import TensorData

log = logging.getLogger(__name__)

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
CACHE_FORMAT = 1


def cache_dir(config: DataConfig) -> Path:
    """Where generated and downloaded data live: --data-dir, else $SPARSE_LANDSCAPE_CACHE,
    else ~/.cache/sparse-landscape."""
    chosen = config.data_dir or os.environ.get("SPARSE_LANDSCAPE_CACHE") or "~/.cache/sparse-landscape"
    return Path(chosen).expanduser()


def from_arrays(name: str, arrays: dict[str, np.ndarray], num_classes: int, device: torch.device) -> TensorData:
    return TensorData(name, *(torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in ARRAY_KEYS),
                      num_classes=num_classes, device=device)


# ---------------------------------------------------------------- MNIST-1D

# `mnist1d.data.get_dataset_args()` of mnist1d 0.0.2, less the download URL. A copy, because
# importing mnist1d imports matplotlib (about 1.4 s): it is imported only to generate.
MNIST1D_ARGS: dict[str, Any] = {
    "num_samples": 5000, "train_split": 0.8, "template_len": 12, "padding": [36, 60], "scale_coeff": 0.4,
    "max_translation": 48, "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2, "shear_scale": 0.75,
    "shuffle_seq": False, "final_seq_length": 40, "seed": 42,
}


def mnist1d_args(seed: int) -> dict[str, Any]:
    """The package's standard generation arguments (4000 train / 1000 test, length 40) with
    our seed; nothing is fetched."""
    args = copy.deepcopy(MNIST1D_ARGS)  # the caller may change it
    args["seed"] = int(seed)
    return args


def mnist1d_cache_path(config: DataConfig, args: dict[str, Any]) -> Path:
    """One file per generation recipe: the key hashes the arguments, the mnist1d version and
    our cache format, so a change of any of them never reads stale data."""
    recipe = {"args": args, "mnist1d": metadata.version("mnist1d"), "format": CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(config) / f"mnist1d-{key}.npz"


def load_mnist1d(config: DataConfig, device: torch.device) -> TensorData:
    args = mnist1d_args(config.seed)
    path = mnist1d_cache_path(config, args)
    arrays = read_mnist1d_cache(path)
    if arrays is None:
        arrays = generate_mnist1d(args)
        write_mnist1d_cache(path, arrays)
    return from_arrays("mnist1d", arrays, 10, device)


def generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """`mnist1d.data.make_dataset` (never `get_dataset`, which downloads). It reseeds the
    global numpy and random RNGs; their states are restored so generation has no side effect."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {"x_train": raw["x"].astype(np.float32), "y_train": raw["y"].astype(np.int64),
            "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int64)}


def read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then it is regenerated)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in ARRAY_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, NotImplementedError):
        log.warning("ignoring unreadable MNIST-1D cache %s; regenerating it", path)
        return None
    return arrays


def write_mnist1d_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically (temporary file + rename); an unwritable cache only costs regeneration."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as error:
        log.warning("could not cache MNIST-1D at %s (%s); it will be regenerated next time", path, error.strerror)


# ---------------------------------------------------------------- synthetic

def load_synthetic(config: DataConfig, device: torch.device) -> TensorData:
    """256 train / 128 test samples of shape (40,), 10 classes: a fixed random mean per class
    plus unit Gaussian noise, all drawn from config.seed. Learnable, tiny, deterministic."""
    generator = seeded_generator(config.seed)
    means = torch.randn(10, 40, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=generator)]
        return means[labels] + torch.randn(n, 40, generator=generator), labels

    (x_train, y_train), (x_test, y_test) = draw(256), draw(128)
    return TensorData("synthetic", x_train, y_train, x_test, y_test, num_classes=10, device=device)


# ---------------------------------------------------------------- npz

MAX_CLASSES = 100_000  # more is a label column that is not class indices; the classifier would not fit in memory

def load_npz(path_text: str, device: torch.device) -> TensorData:
    """A user's arrays: x_* numeric (used as float32, as stored: normalise them beforehand),
    y_* integer class labels; num_classes = largest label + 1."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist; pass npz:PATH to a .npz holding {', '.join(ARRAY_KEYS)}")
    arrays = read_npz_arrays(path)
    check_npz_arrays(path, arrays)
    arrays = {k: v.astype(np.float32 if k.startswith("x") else np.int64) for k, v in arrays.items()}
    num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    if num_classes > MAX_CLASSES:
        raise UserError(f"{path}: labels go up to {num_classes - 1}; labels must be class indices 0..K-1 "
                        f"with K at most {MAX_CLASSES}")
    return from_arrays(f"npz:{path_text}", arrays, num_classes, device)


def read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a readable .npz file ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not an .npz archive with keys {', '.join(ARRAY_KEYS)}")
    with archive:
        missing = [k for k in ARRAY_KEYS if k not in archive.files]
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)} (it has {', '.join(archive.files) or 'nothing'}); "
                            f"an npz data set needs the keys {', '.join(ARRAY_KEYS)}")
        try:
            return {k: archive[k] for k in ARRAY_KEYS}
        except ValueError as error:  # object arrays need pickle, which is refused
            raise UserError(f"{path} holds arrays that cannot be read without pickle ({error}); save plain numeric arrays") from None
        except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as error:  # a damaged member
            raise UserError(f"{path} is a damaged .npz file ({type(error).__name__}: {error})") from None


def check_npz_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "fiub":
            raise UserError(f"{path}: x_{split} has dtype {x.dtype}; inputs must be numeric")
        if y.dtype.kind not in "iu":
            raise UserError(f"{path}: y_{split} has dtype {y.dtype}; labels must be integer class indices")
        if x.ndim < 2 or y.ndim != 1:
            raise UserError(f"{path}: x_{split} must be (N, ...) and y_{split} (N,); got shapes {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise UserError(f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if len(y) == 0:
            raise UserError(f"{path}: the {split} split is empty")
        if y.min() < 0:
            raise UserError(f"{path}: y_{split} has negative labels; labels must be 0..num_classes-1")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise UserError(f"{path}: x_{split} has NaN or infinite values")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(f"{path}: x_train samples have shape {arrays['x_train'].shape[1:]} "
                        f"but x_test samples {arrays['x_test'].shape[1:]}")
