"""Data sets small enough to live on the device as tensors (MNIST-1D, CIFAR, MNIST, npz,
synthetic): shuffling, augmentation and normalisation all happen on the device, per batch."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Data, batch_bounds

Batch = tuple[torch.Tensor, torch.Tensor]


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-sample random crop and horizontal flip of a (B, C, H, W) batch in one gather:
    sample b is zero-padded by `padding` on every side, cropped back to H x W at offset
    (dy[b], dx[b]) of the padded image (0..2*padding), then mirrored left-right if flip[b]."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=x.device)
    columns = torch.arange(w, device=x.device)
    columns = dx[:, None] + torch.where(flip[:, None], w - 1 - columns, columns)
    return padded[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


class TensorData(Data):
    """Train and test tensors on `device`. Inputs are stored as given (uint8 images stay
    uint8 to save memory) and made into float batches by `prepare`: divide by `scale`,
    augment (training only), then normalise with per-channel `mean`/`std`."""

    def __init__(self, name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, num_classes: int, device: torch.device | str = "cpu", *,
                 scale: float | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_padding: int = 0, flip: bool = False, augment: bool = True):
        self.name = name
        self.device = torch.device(device)
        self.x = {"train": x_train.to(self.device), "test": x_test.to(self.device)}
        self.y = {"train": y_train.to(self.device, torch.long), "test": y_test.to(self.device, torch.long)}
        self.num_classes = int(num_classes)
        self.input_shape = tuple(x_train.shape[1:])
        self.scale = scale
        shape = (1, -1) + (1,) * (len(self.input_shape) - 1)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        self.crop_padding = crop_padding
        self.flip = flip
        self.augments = augment and (crop_padding > 0 or flip)

    def num_samples(self, split: str) -> int:
        self.check_split(split)
        return len(self.y[split])

    def train_batches(self, batch_size: int, seed: int, epoch: int, augment: bool = True,
                      shard: Any = None) -> Iterator[Batch]:
        bounds = batch_bounds(self.num_samples("train"), batch_size, shard)
        order, generator = self.epoch_order(seed, epoch)
        draws = self._draw_augmentation(generator, len(order)) if augment and self.augments else None
        return self._train_batches(bounds, order.to(self.device), draws)

    def _train_batches(self, bounds, order, draws) -> Iterator[Batch]:
        for start, stop in bounds:
            index = order[start:stop]
            params = None if draws is None else tuple(d[start:stop] for d in draws)
            yield self.prepare(self.x["train"][index], params), self.y["train"][index]

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | Sequence[int] | None = None
                     ) -> Iterator[Batch]:
        self.check_split(split)
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        indices = self.check_indices(split, indices).to(self.device)
        return ((self.prepare(self.x[split][chunk]), self.y[split][chunk]) for chunk in indices.split(batch_size))

    def _draw_augmentation(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        """Crop offsets (dy, dx) in 0..2*padding and flip flags for the n samples of an epoch,
        in the epoch's order, from the epoch's generator."""
        span = 2 * self.crop_padding + 1
        dy = torch.randint(span, (n,), generator=generator)
        dx = torch.randint(span, (n,), generator=generator)
        flip = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        return tuple(t.to(self.device) for t in (dy, dx, flip))

    def prepare(self, x: torch.Tensor, augmentation: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        x = x.float()
        if self.scale is not None:
            x = x / self.scale
        if augmentation is not None:
            x = crop_flip(x, *augmentation, padding=self.crop_padding)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x
