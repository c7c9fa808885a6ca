"""The interface every data source offers, and the seeded randomness they share.

All randomness of an epoch (order, augmentation) comes from a CPU `torch.Generator` seeded
from (seed, epoch), never from the global RNG: the batches of epoch e are the same whether
the run started at epoch 0 or resumed at e, and on CPU or GPU."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError

SPLITS = ("train", "test")

# Independent streams from one (seed, epoch): what each generator is for.
STREAM_ORDER, STREAM_SUBSET = 0, 1


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator whose state is a well-mixed function of the integers given
    (numpy SeedSequence), so (seed, epoch) and (seed, epoch + 1) are unrelated streams."""
    values = [int(e) % 2**64 for e in entropy]
    # The count, then two 32-bit words per integer: different tuples never share an encoding
    # (SeedSequence pads short entropy with zeros, so (s,) and (s, 0) would otherwise collide).
    words = np.array([len(values)] + [half for v in values for half in (v & 0xFFFFFFFF, v >> 32)], dtype=np.uint32)
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def batch_bounds(n: int, batch_size: int, shard: Any = None) -> list[tuple[int, int]]:
    """(start, stop) of each training batch over n samples: full batches, then the partial
    one unless it would hold a single sample (BatchNorm cannot train on one). With `shard`
    (a distributed.Group), this rank's contiguous part of each of those global batches."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if bounds and bounds[-1][1] - bounds[-1][0] == 1 < batch_size:
        bounds.pop()
    return bounds if shard is None else [shard.span(start, stop) for start, stop in bounds]


class Data:
    """A classification data set with a train and a test split.

    Subclasses set `name`, `num_classes`, `input_shape` (one sample, without the batch dim),
    `device`, and implement `num_samples`, `train_batches`, `eval_batches`."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    device: torch.device

    def num_samples(self, split: str) -> int:
        raise NotImplementedError

    def train_batches(self, batch_size: int, seed: int, epoch: int, augment: bool = True, shard: Any = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled (x, y) batches on the device, order and augmentation a pure
        function of (seed, epoch); with `shard` (a distributed.Group), this rank's part of
        each batch, augmented exactly as that part of the whole batch would be."""
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | Sequence[int] | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches of `split` in order (or of `indices`, in the order given), no augmentation."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(batch_bounds(self.num_samples("train"), batch_size))

    def subset_indices(self, split: str, n: int, seed: int) -> torch.Tensor:
        """A fixed, seeded subset of n sample indices of `split`, sorted (an int64 CPU tensor)."""
        available = self.num_samples(split)
        if not 1 <= n <= available:
            raise UserError(f"asked for {n} samples of the {split} split of {self.name}, which has {available}; "
                            f"choose 1..{available}")
        order = torch.randperm(available, generator=seeded_generator(seed, STREAM_SUBSET, SPLITS.index(split)))
        return order[:n].sort().values

    def epoch_order(self, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """The training permutation of this epoch and the generator that then draws its
        augmentation (both on the CPU)."""
        generator = seeded_generator(seed, STREAM_ORDER, epoch)
        return torch.randperm(self.num_samples("train"), generator=generator), generator

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose train or test")

    def check_indices(self, split: str, indices: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
        """`indices` as an int64 CPU tensor (all samples in order when None), range-checked."""
        n = self.num_samples(split)
        if indices is None:
            return torch.arange(n)
        indices = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise UserError(f"sample indices out of range for the {split} split of {self.name} ({n} samples)")
        return indices
