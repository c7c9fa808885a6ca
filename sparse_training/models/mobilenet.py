"""MobileNetV2 (Sandler et al. 2018), CIFAR variant as in kuangliu/pytorch-cifar: the stem is
a stride-1 3x3 conv and the second stage (t=6, c=24, n=2) has stride 1, so 32x32 inputs
reach the last stage at 4x4. Inverted residual blocks (1x1 expansion + BN + ReLU6 unless
t = 1, 3x3 depthwise conv + BN + ReLU6, 1x1 linear projection + BN; identity residual where
the stride is 1 and the channels are kept), a 1x1 conv to 1280 channels + BN + ReLU6, global
average pooling and a linear classifier; no dropout, no conv biases. The channel counts
follow torchvision's rounding to multiples of 8, so the parameter count equals
torchvision's `mobilenet_v2` (strides hold no parameters)."""

from __future__ import annotations

import math

import torch
from torch import nn

# (expansion t, channels c, blocks n, stride s of the first block); CIFAR strides.
CIFAR_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8, min_value: int = 8) -> int:
    """torchvision's `_make_divisible`: the nearest multiple of `divisor` (at least
    `min_value`), rounded up where rounding would lose more than 10 %."""
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """[1x1 expand + BN + ReLU6] -> 3x3 depthwise + BN + ReLU6 -> 1x1 project + BN (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(cin * expansion))
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden), conv_bn_act(hidden, cout, 1, act=False)]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """`stem` (3x3 conv + BN + ReLU6), `stages` (one Sequential of InvertedResiduals per
    row of CIFAR_STAGES), `last` (1x1 conv + BN + ReLU6), global average pool, `classifier`."""

    def __init__(self, num_classes: int, in_channels: int, width: float):
        super().__init__()
        cin = make_divisible(32 * width)
        self.stem = conv_bn_act(in_channels, cin, 3)
        stages = []
        for expansion, channels, count, stride in CIFAR_STAGES:
            cout = make_divisible(channels * width)
            blocks = []
            for index in range(count):
                blocks.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expansion))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        last = make_divisible(1280 * max(1.0, width))
        self.last = conv_bn_act(cin, last, 1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last(self.stages(self.stem(x)))
        return self.classifier(out.mean(dim=(2, 3)))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0 or not math.isfinite(width):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return MobileNetV2(num_classes, in_channels, width)
