"""LeNet-5 style network: two conv5x5 + ReLU + maxpool stages, then 120 -> 84 -> classes."""

from __future__ import annotations

import torch
from torch import nn

from condense.models._base import ClassifierNet, check_spatial, conv_out, first_conv_padding
from condense.models._factory import MODELS


class LeNet(ClassifierNet):
    """Conv5x5(6) -> ReLU -> MaxPool -> Conv5x5(16) -> ReLU -> MaxPool -> FC120 -> FC84 -> FC.

    28x28 inputs get padding 2 on the first conv (so the map sizes equal those of 32x32 inputs).

    Attributes:
        stage1, stage2: the conv stages (``nn.Sequential`` ending in the max pool).
        fc1, fc2: ``nn.Sequential(Linear, ReLU)`` with 120 and 84 units.
        classifier: ``nn.Linear(84, num_classes)``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int]) -> None:
        super().__init__()
        pad = first_conv_padding(im_size, 0)
        self.stage1 = nn.Sequential(nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.stage2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2))
        size = conv_out(conv_out(im_size, 5, 1, pad), 2, 2)
        size = conv_out(conv_out(size, 5), 2, 2)
        check_spatial("lenet", size, im_size)
        self.fc1 = nn.Sequential(nn.Linear(16 * size[0] * size[1], 120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 84)``: activations of the last hidden layer."""
        maps = self.stage2(self.stage1(x))
        return self.fc2(self.fc1(torch.flatten(maps, 1)))

    def feature_modules(self) -> list[nn.Module]:
        """The two conv stages (spatial maps after pooling)."""
        return [self.stage1, self.stage2]


@MODELS.register("lenet")
def build_lenet(channels: int, num_classes: int, im_size: tuple[int, int]) -> LeNet:
    """LeNet (no options)."""
    return LeNet(channels, num_classes, im_size)
