"""Image classifiers for (N, C, H, W) inputs, CIFAR style (3x3 stem, no max-pool).

`resnet20/32/56` are the CIFAR ResNets of He et al. (2016), 16-32-64 channels, with 1x1 conv
+ BatchNorm projection shortcuts where the shape changes (option B), so every shortcut is a
real, prunable layer. `resnet18/50` are the ImageNet ResNets with the CIFAR stem; `vgg16` has
BatchNorm after every conv. Each takes a `width` multiplier on every channel count."""

from __future__ import annotations

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


def projection(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a 1x1 conv + BN (He et al. option B)."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.shortcut = projection(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = conv_bn(cin, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, cout, 1)
        self.shortcut = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem conv + BN + ReLU, stages of residual blocks (the first of each stage strided),
    global average pooling, linear classifier."""

    def __init__(self, block: type, stem: int, planes: tuple[int, ...], blocks: tuple[int, ...],
                 strides: tuple[int, ...], num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, stem, 3), nn.ReLU())
        stages, cin = [], stem
        for stage_planes, count, stride in zip(planes, blocks, strides):
            layers = []
            for index in range(count):
                layers.append(block(cin, stage_planes, stride if index == 0 else 1))
                cin = stage_planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.classifier(out.mean(dim=(2, 3)))


def cifar_resnet(depth: int, num_classes: int, in_channels: int, width: float) -> ResNet:
    """He et al. CIFAR ResNet of depth 6n+2: three stages of n basic blocks, 16/32/64 channels."""
    n = (depth - 2) // 6
    planes = tuple(scaled(c, width) for c in (16, 32, 64))
    return ResNet(BasicBlock, planes[0], planes, (n, n, n), (1, 2, 2), num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return cifar_resnet(20, num_classes, in_channels, width)


def resnet32(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return cifar_resnet(32, num_classes, in_channels, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return cifar_resnet(56, num_classes, in_channels, width)


def _imagenet_resnet(block: type, blocks: tuple[int, ...], num_classes: int, in_channels: int, width: float) -> ResNet:
    planes = tuple(scaled(c, width) for c in (64, 128, 256, 512))
    return ResNet(block, planes[0], planes, blocks, (1, 2, 2, 2), num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return _imagenet_resnet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width)


def resnet50(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    return _imagenet_resnet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width)


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Conv3x3 + BN + ReLU stacks with 2x2 max-pools (ceil mode, so 28x28 inputs survive five
    pools), global average pooling and one linear classifier, as in CIFAR lottery-ticket code."""

    def __init__(self, layers: tuple, num_classes: int, in_channels: int, width: float):
        super().__init__()
        modules: list[nn.Module] = []
        cin = in_channels
        for item in layers:
            if item == "M":
                modules.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                cout = scaled(item, width)
                modules += [*conv_bn(cin, cout, 3), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    return VGG(VGG16_LAYERS, num_classes, in_channels, width)
