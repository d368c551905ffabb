"""ConvNet, the field's default network ("ConvNet-3"), and its cross-architecture variants.

Block = Conv3x3(width) -> norm -> activation -> pool2x2; ``depth`` blocks; the flattened map after
the last block is the embedding, ``Linear(width * h * w, num_classes)`` the classifier. For
28x28 inputs the first conv pads by 3 (28 -> 32), so ConvNet-3 ends on a 4x4 map (embedding 2048).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from condense.models._base import (
    ACTIVATIONS,
    NORMS_2D,
    POOLINGS,
    ClassifierNet,
    check_choice,
    check_positive,
    check_spatial,
    conv_out,
    first_conv_padding,
    make_activation,
    make_norm,
    make_pool,
)
from condense.models._factory import MODELS, Builder


class ConvNet(ClassifierNet):
    """``depth`` x [Conv3x3(width) -> norm -> act -> pool] -> flatten -> Linear.

    Attributes:
        features: ``nn.Sequential`` of ``depth`` blocks, each an ``nn.Sequential``
            ``[Conv2d, norm?, activation, pool?]`` (norm / pool left out when ``none``).
        classifier: ``nn.Linear(width * h * w, num_classes)``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: tuple[int, int],
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        pooling: str = "avgpool",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_positive("width", width)
        check_positive("depth", depth)
        check_choice("norm", norm, NORMS_2D)
        check_choice("pooling", pooling, POOLINGS)
        check_choice("activation", activation, ACTIVATIONS)
        size = im_size
        blocks: list[nn.Module] = []
        in_ch = channels
        for d in range(depth):
            pad = first_conv_padding(im_size, 1) if d == 0 else 1
            size = conv_out(size, 3, 1, pad)
            layers: list[nn.Module] = [nn.Conv2d(in_ch, width, 3, padding=pad)]
            if norm != "none":
                layers.append(make_norm(norm, width, size))
            layers.append(make_activation(activation))
            if pooling != "none":
                layers.append(make_pool(pooling))
                size = conv_out(size, 2, 2)
            check_spatial("convnet", size, im_size)
            blocks.append(nn.Sequential(*layers))
            in_ch = width
        self.features = nn.Sequential(*blocks)
        self.feature_shape = (width, size[0], size[1])
        self.classifier = nn.Linear(width * size[0] * size[1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, width * h * w)`` flattened last-block map."""
        return torch.flatten(self.features(x), 1)

    def feature_modules(self) -> list[nn.Module]:
        """The ``depth`` blocks (each output is the map after pooling)."""
        return list(self.features)


@MODELS.register("convnet")
def build_convnet(
    channels: int,
    num_classes: int,
    im_size: tuple[int, int],
    *,
    width: int = 128,
    depth: int = 3,
    norm: str = "instancenorm",
    pooling: str = "avgpool",
    activation: str = "relu",
) -> ConvNet:
    """ConvNet; defaults are ConvNet-3 (width 128, instance norm, ReLU, average pooling)."""
    return ConvNet(channels, num_classes, im_size, width, depth, norm, pooling, activation)


def _variant(**fixed: object) -> Builder:
    """A ``build_convnet`` with some kwargs fixed (and removed from the accepted kwargs)."""

    def build(channels: int, num_classes: int, im_size: tuple[int, int], **kwargs: object) -> ConvNet:
        return build_convnet(channels, num_classes, im_size, **fixed, **kwargs)  # type: ignore[arg-type]

    sig = inspect.signature(build_convnet)
    params = [p for p in sig.parameters.values() if p.name not in fixed]
    build.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    desc = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
    build.__doc__ = f"ConvNet with {desc}; the other ConvNet kwargs are accepted."
    return build


_VARIANTS: dict[str, dict[str, object]] = {
    "convnet_w32": {"width": 32},
    "convnet_w64": {"width": 64},
    "convnet_w256": {"width": 256},
    "convnet_d1": {"depth": 1},
    "convnet_d2": {"depth": 2},
    "convnet_d4": {"depth": 4},
    "convnet_bn": {"norm": "batchnorm"},
    "convnet_ln": {"norm": "layernorm"},
    "convnet_gn": {"norm": "groupnorm"},
    "convnet_nn": {"norm": "none"},
    "convnet_mp": {"pooling": "maxpool"},
    "convnet_np": {"pooling": "none"},
    "convnet_sigmoid": {"activation": "sigmoid"},
    "convnet_leakyrelu": {"activation": "leakyrelu"},
    "convnet_swish": {"activation": "swish"},
}

for _name, _fixed in _VARIANTS.items():
    MODELS.add(_name, _variant(**_fixed))
