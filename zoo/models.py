"""Architectures. Every model takes float32 NCHW pixels in [0, 1] and normalises inside, so the served
model's input is plain pixels. Top-level children have stable names (``layer1`` ...) to split at."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fire_backend.errors import InvalidInputError

CHANNEL_MEAN = (0.485, 0.456, 0.406)
CHANNEL_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...] = CHANNEL_MEAN, std: tuple[float, ...] = CHANNEL_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PixelInput(nn.Module):
    """Raw pixels in: uint8 (N, H, W, C) as image files decode and stock image clients send, turned into
    what the network was trained on (float NCHW in [0, 1], then ``normalize``)."""

    def __init__(self, normalize: nn.Module):
        super().__init__()
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x.permute(0, 3, 1, 2).float() / 255.0)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet with three stages (widths w1/w2/w3, ``blocks`` blocks each)."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 1):
        super().__init__()
        w1, w2, w3 = widths
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = self._stage(w1, w1, blocks, stride=1)
        self.layer2 = self._stage(w1, w2, blocks, stride=2)
        self.layer3 = self._stage(w2, w3, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(c_in, c_out, stride)]
        layers += [BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class VGGSmall(nn.Module):
    """A VGG-style net: three stages of ``blocks`` conv-BN-ReLU layers, each stage ending in max-pooling."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 2):
        super().__init__()
        self.normalize = Normalize()
        c_in, stages = 3, []
        for w in widths:
            layers: list[nn.Module] = []
            for _ in range(blocks):
                layers += [nn.Conv2d(c_in, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c_in = w
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.normalize(x))))
        return self.fc(self.flatten(self.pool(x)))


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet_small"
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    extra: dict = field(default_factory=dict)


ARCHITECTURES = {"resnet_small": ResNetSmall, "vgg_small": VGGSmall}


def build_model(config: ModelConfig) -> nn.Module:
    if config.arch not in ARCHITECTURES:
        raise InvalidInputError(f"unknown architecture {config.arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[config.arch](config.num_classes, tuple(config.widths), config.blocks, **config.extra)
