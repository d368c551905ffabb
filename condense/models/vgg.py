"""VGG11 with instance norm (GroupNorm(c, c)) or BatchNorm after every conv."""

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

VGG_NORMS = ("instancenorm", "batchnorm")
# Conv widths of VGG11, one inner list per stage; every stage ends in a 2x2 max pool.
VGG11_STAGES: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG(ClassifierNet):
    """Stages of [Conv3x3 -> norm -> ReLU]* -> MaxPool2x2, then flatten -> Linear.

    28x28 inputs get padding 3 on the first conv (28 -> 32). After five pools a 32x32 input
    leaves a 1x1 map (embedding 512); 64x64 leaves 2x2 (embedding 2048).

    Attributes:
        features: ``nn.Sequential`` of stages, each an ``nn.Sequential`` ending in the max pool.
        classifier: ``nn.Linear(512 * h * w, num_classes)``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: tuple[int, int],
        stages: tuple[tuple[int, ...], ...] = VGG11_STAGES,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, VGG_NORMS)
        size, in_ch, first = im_size, channels, True
        blocks: list[nn.Module] = []
        for widths in stages:
            layers: list[nn.Module] = []
            for width in widths:
                pad = first_conv_padding(im_size, 1) if first else 1
                size = conv_out(size, 3, 1, pad)
                layers += [nn.Conv2d(in_ch, width, 3, padding=pad), make_norm(norm, width, size), nn.ReLU()]
                in_ch, first = width, False
            layers.append(nn.MaxPool2d(2, 2))
            size = conv_out(size, 2, 2)
            check_spatial("vgg", size, im_size)
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(in_ch * size[0] * size[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 512 * h * w)``."""
        return torch.flatten(self.features(x), 1)

    def feature_modules(self) -> list[nn.Module]:
        """The pooling stages (five for VGG11)."""
        return list(self.features)


@MODELS.register("vgg11")
def build_vgg11(
    channels: int, num_classes: int, im_size: tuple[int, int], *, norm: str = "instancenorm"
) -> VGG:
    """VGG11 with instance norm (``norm='batchnorm'`` = ``vgg11_bn``)."""
    return VGG(channels, num_classes, im_size, VGG11_STAGES, norm)


@MODELS.register("vgg11_bn")
def build_vgg11_bn(channels: int, num_classes: int, im_size: tuple[int, int]) -> VGG:
    """VGG11 with BatchNorm."""
    return VGG(channels, num_classes, im_size, VGG11_STAGES, "batchnorm")
