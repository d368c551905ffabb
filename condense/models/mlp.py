"""MLP: flatten -> Linear(C*H*W, width) -> ReLU -> Linear(width, width) -> ReLU -> Linear."""

from __future__ import annotations

import torch
from torch import nn

from condense.models._base import ClassifierNet, check_positive
from condense.models._factory import MODELS


class MLP(ClassifierNet):
    """Three linear layers (two hidden ReLU layers of ``width``), as DC's MLP.

    Attributes:
        layer1, layer2: ``nn.Sequential(Linear, ReLU)`` hidden layers.
        classifier: ``nn.Linear(width, num_classes)``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int], width: int = 128) -> None:
        super().__init__()
        check_positive("width", width)
        self.layer1 = nn.Sequential(nn.Linear(channels * im_size[0] * im_size[1], width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, width)``: the last hidden layer's activations."""
        return self.layer2(self.layer1(torch.flatten(x, 1)))

    def feature_modules(self) -> list[nn.Module]:
        """The two hidden layers (outputs ``(N, width)``)."""
        return [self.layer1, self.layer2]


@MODELS.register("mlp")
def build_mlp(channels: int, num_classes: int, im_size: tuple[int, int], *, width: int = 128) -> MLP:
    """MLP with two hidden layers of ``width`` (128) units."""
    return MLP(channels, num_classes, im_size, width)
