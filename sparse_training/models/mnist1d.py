"""Models for MNIST-1D inputs, shape (N, 40) (or (N, C, L) for multi-channel sequences).

`mlp` and `cnn1d` are the baselines of Greydanus & Kobak (the `MLPBase` and `ConvBase` of
the MNIST-1D repository: about 68 % and 94 % test accuracy); `resnet1d` is a small residual
network with BatchNorm, so that BatchNorm-specific analyses have a fast CPU subject."""

from __future__ import annotations

import torch
from torch import nn


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(N, L) -> (N, 1, L); (N, C, L) unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def conv1d_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class MLP(nn.Module):
    """input_size -> hidden -> hidden -> num_classes, ReLU (MNIST-1D `MLPBase`: 40-100-100-10)."""

    def __init__(self, num_classes: int = 10, input_size: int = 40, hidden_size: int = 100):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(input_size, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN1d(nn.Module):
    """MNIST-1D `ConvBase`: three stride-2 Conv1d (kernels 5, 3, 3, padding 1) with ReLU and a
    linear head on the flattened features (25 channels x 5 positions for length 40)."""

    KERNELS = (5, 3, 3)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_length: int = 40, channels: int = 25):
        super().__init__()
        layers: list[nn.Module] = []
        length, cin = input_length, in_channels
        for kernel in self.KERNELS:
            layers += [nn.Conv1d(cin, channels, kernel, stride=2, padding=1), nn.ReLU()]
            length, cin = conv1d_out_length(length, kernel, 2, 1), channels
        if length < 1:
            raise ValueError(f"input_length {input_length} is too short for three stride-2 convolutions")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(as_sequence(x)).flatten(1))


class BasicBlock1d(nn.Module):
    """Two 3-tap convolutions with BatchNorm; a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem (5-tap conv, BN, ReLU), three residual stages of one block each with
    width, 2*width, 4*width channels at strides 1, 2, 2, global average pooling, linear head.
    About 11k parameters at the default width 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 10):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        self.stem = nn.Sequential(nn.Conv1d(in_channels, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.layers = nn.Sequential(
            BasicBlock1d(width, width, 1), BasicBlock1d(width, 2 * width, 2), BasicBlock1d(2 * width, 4 * width, 2)
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(as_sequence(x)))
        return self.classifier(out.mean(dim=2))
