"""`imagefolder:PATH[:SIZE]`: ImageNet-style folders PATH/train/CLASS/*.jpg and
PATH/val/CLASS/*.jpg (or PATH/test), too large for the device: read through a DataLoader.

Training: RandomResizedCrop(SIZE) + horizontal flip; evaluation: Resize(SIZE*256/224) +
CenterCrop(SIZE); SIZE defaults to 224. Two paths (config `image_decoding`):

- pil (auto on CPU): DataLoader workers decode and transform with PIL. The random transforms
  of each sample run under a seed drawn from the epoch's (seed, epoch) generator, inside a
  forked RNG, so augmentation is reproducible, independent of worker count, and leaves the
  global RNG untouched.
- device (auto on CUDA): workers only read bytes; decoding (batched nvjpeg), crop, resize and
  flip run on the device (see `jpeg`), as PIL decoding in workers holds ImageNet training on a
  GPU to a few hundred images/s per core. Its crops follow the same algorithm from the same
  kind of per-sample draws, so it is just as reproducible, but not bit-identical to pil."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..errors import UserError
from .base import Data, batch_bounds
from .jpeg import IMAGENET_MEAN, IMAGENET_STD, DeviceImages, random_draws

DEFAULT_SIZE = 224


def parse_imagefolder(spec: str) -> tuple[Path, int]:
    """'PATH' or 'PATH:SIZE' (the part after `imagefolder:`) -> (path, image size)."""
    match = re.fullmatch(r"(.+):(\d+)", spec)
    if match and not Path(spec).expanduser().is_dir():
        path, size = match.group(1), int(match.group(2))
    else:
        path, size = spec, DEFAULT_SIZE
    if size < 8:
        raise UserError(f"image size {size} in imagefolder:{spec} is too small; use at least 8")
    return Path(path).expanduser(), size


class SeededImages(Dataset):
    """(image, label) pairs of a folder. An item is an index, or (index, seed) to run the
    random transform under that seed."""

    def __init__(self, samples: Sequence[tuple[str, int]], loader: Callable[[str], Any], transform: Callable):
        self.samples, self.loader, self.transform = samples, loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        image = self.loader(path)
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


class FolderData(Data):
    def __init__(self, spec: str, config: DataConfig, device: torch.device):
        from torchvision import datasets, transforms

        root, size = parse_imagefolder(spec)
        self.name = f"imagefolder:{spec}"
        self.device = torch.device(device)
        self.num_workers = config.num_workers
        train, test = _open_folder(datasets.ImageFolder, root, "train"), _open_folder(datasets.ImageFolder, root, "val", "test")
        if train.classes != test.classes:
            raise UserError(f"{root}: the train and evaluation folders have different classes; give them the same class folders")
        self.num_classes = len(train.classes)
        self.input_shape = (3, size, size)
        self.samples = {"train": train.samples, "test": test.samples}
        self.augment = config.augment
        self.decoding = config.image_decoding
        if self.decoding == "auto":
            self.decoding = "device" if self.device.type == "cuda" else "pil"
        if self.decoding == "device":
            self.device_images = DeviceImages(size, self.device, config.num_workers)
            return
        normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        random_view = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *normalize])
        center_view = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), *normalize])
        self.augmented = SeededImages(train.samples, train.loader, random_view) if config.augment else None
        self.sets = {"train": SeededImages(train.samples, train.loader, center_view),
                     "test": SeededImages(test.samples, test.loader, center_view)}

    def num_samples(self, split: str) -> int:
        self.check_split(split)
        return len(self.samples[split])

    def train_batches(self, batch_size: int, seed: int, epoch: int, augment: bool = True, shard: Any = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bounds = batch_bounds(self.num_samples("train"), batch_size, shard)
        order, generator = self.epoch_order(seed, epoch)
        if self.decoding == "device":
            draws = random_draws(len(order), generator) if augment and self.augment else None
            batches = [order[start:stop].tolist() for start, stop in bounds]
            views = None if draws is None else [draws[start:stop] for start, stop in bounds]
            return self.device_images.batches(self.samples["train"], batches, views)
        if augment and self.augmented is not None:
            seeds = torch.randint(2**62, (len(order),), generator=generator).tolist()
            items: list = list(zip(order.tolist(), seeds))
            dataset = self.augmented
        else:
            items, dataset = order.tolist(), self.sets["train"]
        return self._load(dataset, [items[start:stop] for start, stop in bounds])

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | Sequence[int] | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.check_split(split)
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        items = self.check_indices(split, indices).tolist()
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        if self.decoding == "device":
            return self.device_images.batches(self.samples[split], batches, None)
        return self._load(self.sets[split], batches)

    def _load(self, dataset: Dataset, batches: list[list]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A private generator: the DataLoader draws its worker base seed from it instead of
        # the global RNG (our transforms are seeded per sample anyway).
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _open_folder(image_folder: type, root: Path, *names: str) -> Any:
    for name in names:
        if (root / name).is_dir():
            try:
                return image_folder(str(root / name))
            except (FileNotFoundError, OSError) as error:
                raise UserError(f"{root / name} holds no images in class folders ({error})") from None
    raise UserError(f"{root} has no {' or '.join(n + '/' for n in names)} folder; imagefolder:PATH needs "
                    "PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg")
