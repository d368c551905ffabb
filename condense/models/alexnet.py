"""AlexNet as used in dataset distillation papers (a small 32x32 variant, not ImageNet's)."""

from __future__ import annotations

import torch
from torch import nn

from condense.models._base import (
    ClassifierNet,
    check_choice,
    check_spatial,
    conv_out,
    first_conv_padding,
    make_norm,
)
from condense.models._factory import MODELS

ALEXNET_NORMS = ("none", "batchnorm")


def _conv(in_ch: int, out_ch: int, k: int, pad: int, norm: str, hw: tuple[int, int]) -> list[nn.Module]:
    """``[Conv2d, norm?, ReLU]``."""
    norm_layer = [] if norm == "none" else [make_norm(norm, out_ch, hw)]
    return [nn.Conv2d(in_ch, out_ch, k, padding=pad), *norm_layer, nn.ReLU()]


class AlexNet(ClassifierNet):
    """Conv5x5(128) -> pool -> Conv5x5(192) -> pool -> Conv3x3(256, 192, 192) -> pool -> Linear.

    Each conv is followed by the optional norm and ReLU; pools are 2x2 max pools; 28x28 inputs
    get padding 4 (instead of 2) on the first conv. The flattened last map is the embedding.

    Attributes:
        features: ``nn.Sequential`` of three stages, each ending in a max pool.
        classifier: ``nn.Linear(192 * h * w, num_classes)``.
    """

    def __init__(self, channels: int, num_classes: int, im_size: tuple[int, int], norm: str = "none") -> None:
        super().__init__()
        check_choice("norm", norm, ALEXNET_NORMS)
        pad = first_conv_padding(im_size, 2)
        s1 = conv_out(im_size, 5, 1, pad)
        stage1 = nn.Sequential(*_conv(channels, 128, 5, pad, norm, s1), nn.MaxPool2d(2, 2))
        s2 = conv_out(s1, 2, 2)
        stage2 = nn.Sequential(*_conv(128, 192, 5, 2, norm, s2), nn.MaxPool2d(2, 2))
        s3 = conv_out(s2, 2, 2)
        stage3 = nn.Sequential(
            *_conv(192, 256, 3, 1, norm, s3),
            *_conv(256, 192, 3, 1, norm, s3),
            *_conv(192, 192, 3, 1, norm, s3),
            nn.MaxPool2d(2, 2),
        )
        size = conv_out(s3, 2, 2)
        check_spatial("alexnet", size, im_size)
        self.features = nn.Sequential(stage1, stage2, stage3)
        self.classifier = nn.Linear(192 * size[0] * size[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 192 * h * w)`` (3072 for 28x28 and 32x32 inputs)."""
        return torch.flatten(self.features(x), 1)

    def feature_modules(self) -> list[nn.Module]:
        """The three pooling stages."""
        return list(self.features)


@MODELS.register("alexnet")
def build_alexnet(
    channels: int, num_classes: int, im_size: tuple[int, int], *, norm: str = "none"
) -> AlexNet:
    """AlexNet without normalization (``norm='batchnorm'`` = ``alexnet_bn``)."""
    return AlexNet(channels, num_classes, im_size, norm)


@MODELS.register("alexnet_bn")
def build_alexnet_bn(channels: int, num_classes: int, im_size: tuple[int, int]) -> AlexNet:
    """AlexNet with BatchNorm after every conv."""
    return AlexNet(channels, num_classes, im_size, "batchnorm")
