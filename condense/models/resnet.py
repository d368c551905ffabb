"""ResNet18, CIFAR style (3x3 stride-1 stem, no max pool), and the "AP" variant of DC/DSA.

Norm is instance norm (GroupNorm(c, c)) or BatchNorm. ``resnet18``: global average pooling after
the last stage (512-d embedding; equal to DC's 4x4 average pool for 28x28 and 32x32 inputs).
``resnet18_ap``: every stride-2 conv becomes a stride-1 conv followed by AvgPool2d(2), and the
last map is flattened without pooling (512 * 4 * 4 for 32x32, 512 * 3 * 3 for 28x28).
"""

from __future__ import annotations

import torch
from torch import nn

from condense.models._base import ClassifierNet, check_choice, check_spatial, conv_out, make_norm
from condense.models._factory import MODELS
from condense.models._pool import AvgPool2x2

RESNET_NORMS = ("instancenorm", "batchnorm")
STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; ``stride`` 2 halves the map.

    With ``avgpool_down`` the downsampling is conv(stride 1) -> AvgPool2d(2) (main and shortcut path)
    instead of a stride-2 conv.
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, norm: str, avgpool_down: bool, hw_in: tuple[int, int]
    ) -> None:
        super().__init__()
        conv_stride = 1 if avgpool_down else stride
        hw = conv_out(hw_in, 3, conv_stride, 1)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=conv_stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_ch, hw)
        self.act = nn.ReLU()
        down = avgpool_down and stride != 1
        self.pool = AvgPool2x2() if down else nn.Identity()
        hw = conv_out(hw, 2, 2) if down else hw
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch, hw)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            proj = nn.Conv2d(in_ch, out_ch, 1, stride=conv_stride, bias=False)
            pool = [AvgPool2x2()] if down else []
            self.shortcut = nn.Sequential(proj, *pool, make_norm(norm, out_ch, hw))
        self.out_hw = hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_ch, H, W)`` -> ``(N, out_ch, H', W')``."""
        out = self.pool(self.act(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(ClassifierNet):
    """Stem (conv3x3(64) -> norm -> ReLU) -> four stages of BasicBlocks -> head -> Linear.

    Attributes:
        stem: ``nn.Sequential(Conv2d, norm, ReLU)``.
        layer1..layer4: the stages (``nn.Sequential`` of BasicBlocks), widths 64/128/256/512.
        pool: global average pooling (``nn.AdaptiveAvgPool2d(1)``) or ``nn.Identity`` (AP).
        classifier: ``nn.Linear(D, num_classes)``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: tuple[int, int],
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        norm: str = "instancenorm",
        avgpool_down: bool = False,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, RESNET_NORMS)
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False), make_norm(norm, 64, im_size), nn.ReLU()
        )
        hw, in_ch = im_size, 64
        stages: list[nn.Sequential] = []
        for i, (width, n) in enumerate(zip(STAGE_WIDTHS, blocks, strict=True)):
            layer: list[BasicBlock] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                block = BasicBlock(in_ch, width, stride, norm, avgpool_down, hw)
                hw, in_ch = block.out_hw, width
                layer.append(block)
            check_spatial("resnet", hw, im_size)
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool: nn.Module = nn.Identity() if avgpool_down else nn.AdaptiveAvgPool2d(1)
        dim = in_ch * hw[0] * hw[1] if avgpool_down else in_ch
        self.classifier = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, D)``: 512 (global pool) or ``512 * h * w`` (AP)."""
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return torch.flatten(self.pool(out), 1)

    def feature_modules(self) -> list[nn.Module]:
        """The four stages."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]


@MODELS.register("resnet18")
def build_resnet18(
    channels: int, num_classes: int, im_size: tuple[int, int], *, norm: str = "instancenorm"
) -> ResNet:
    """ResNet18 (CIFAR stem) with instance norm; ``norm='batchnorm'`` = ``resnet18_bn``."""
    return ResNet(channels, num_classes, im_size, (2, 2, 2, 2), norm, avgpool_down=False)


@MODELS.register("resnet18_bn")
def build_resnet18_bn(channels: int, num_classes: int, im_size: tuple[int, int]) -> ResNet:
    """ResNet18 (CIFAR stem) with BatchNorm."""
    return ResNet(channels, num_classes, im_size, (2, 2, 2, 2), "batchnorm", avgpool_down=False)


@MODELS.register("resnet18_ap")
def build_resnet18_ap(
    channels: int, num_classes: int, im_size: tuple[int, int], *, norm: str = "instancenorm"
) -> ResNet:
    """ResNet18-AP: stride-2 convs replaced by stride-1 conv + AvgPool2d(2); flattened last map."""
    return ResNet(channels, num_classes, im_size, (2, 2, 2, 2), norm, avgpool_down=True)
