"""Shared pieces of the model zoo: the network protocol, layer factories, shape arithmetic, init.

Every zoo network is a :class:`ClassifierNet`: ``embed(x) -> (N, D)`` features, ``classifier`` the
final ``nn.Linear(D, num_classes)``, ``forward(x) = classifier(embed(x))`` and
``feature_modules()`` the modules whose outputs are the successive block feature maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from condense.errors import ConfigError
from condense.models._pool import AvgPool2x2
from condense.ops._nn import BATCHNORMS as _BATCHNORMS
from condense.ops._nn import has_batchnorm

NORMS_2D = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu", "swish")
POOLINGS = ("avgpool", "maxpool", "none")

_NORMS = (*_BATCHNORMS, nn.GroupNorm, nn.LayerNorm)


class ClassifierNet(nn.Module):
    """Base class of every zoo network.

    Subclasses set ``self.classifier`` (the final ``nn.Linear``) and implement :meth:`embed` and
    :meth:`feature_modules`. No forward pass branches on tensor values, so
    ``torch.func.functional_call`` and ``vmap`` over stacked weights work (without BatchNorm).
    """

    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features right before the classifier.

        Args:
            x: ``(N, C, H, W)`` images.

        Returns:
            ``(N, D)`` with ``D == self.classifier.in_features``.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images -> ``(N, num_classes)`` logits."""
        return self.classifier(self.embed(x))

    def feature_modules(self) -> list[nn.Module]:
        """Modules whose forward outputs are the successive block feature maps (for hooks)."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """``D``, the width of :meth:`embed`'s output."""
        return int(self.classifier.in_features)

    @property
    def has_batchnorm(self) -> bool:
        """True if any submodule is a BatchNorm (train-mode statistics couple the batch)."""
        return has_batchnorm(self)


# --------------------------------------------------------------------------- validation / shapes


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def check_positive(what: str, value: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def as_pair(im_size: tuple[int, int] | list[int] | int) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` -> ``(28, 28)``; raises :class:`ConfigError` on anything else."""
    pair = (im_size, im_size) if isinstance(im_size, int) else tuple(im_size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        raise ConfigError(f"im_size must be an int or a pair of ints (H, W), got {im_size!r}")
    if min(pair) < 1:
        raise ConfigError(f"im_size must be positive, got {im_size!r}")
    return (int(pair[0]), int(pair[1]))


def first_conv_padding(im_size: tuple[int, int], base: int) -> int:
    """Padding of a network's first conv: ``base``, or ``base + 2`` for 28x28 inputs.

    The classic zoo (DC/DSA) pads 28x28 (MNIST-like) images by two extra pixels per side so that
    the rest of the network sees the same map sizes as for 32x32 images.
    """
    return base + 2 if tuple(im_size) == (28, 28) else base


def conv_out(size: tuple[int, int], kernel: int, stride: int = 1, padding: int = 0) -> tuple[int, int]:
    """Spatial size after a square conv (or pool) with the given kernel, stride and padding."""
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in size)  # type: ignore[return-value]


def check_spatial(model: str, size: tuple[int, int], im_size: tuple[int, int]) -> None:
    """Raise :class:`ConfigError` if the input is too small for ``model`` (a map shrank to 0)."""
    if min(size) < 1:
        raise ConfigError(f"im_size {im_size} is too small for {model}: a feature map shrinks to {size}")


# --------------------------------------------------------------------------- layer factories


def make_norm(kind: str, channels: int, hw: tuple[int, int]) -> nn.Module:
    """A 2-D normalization layer.

    Args:
        kind: ``instancenorm`` (GroupNorm(C, C)), ``batchnorm``, ``layernorm`` (over C, H, W),
            ``groupnorm`` (4 groups). ``none`` is handled by the caller.
        channels: ``C``.
        hw: ``(H, W)`` of the map it normalizes (LayerNorm's shape).
    """
    check_choice("norm", kind, NORMS_2D[:-1])
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, hw[0], hw[1]], elementwise_affine=True)
    if channels % 4:
        raise ConfigError(f"groupnorm uses 4 groups; width {channels} is not divisible by 4")
    return nn.GroupNorm(4, channels, affine=True)


def make_activation(kind: str) -> nn.Module:
    """``relu`` | ``sigmoid`` | ``leakyrelu`` (slope 0.01) | ``swish`` (SiLU); never in-place."""
    check_choice("activation", kind, ACTIVATIONS)
    table: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "leakyrelu": nn.LeakyReLU,
        "swish": nn.SiLU,
    }
    return table[kind]()


def make_pool(kind: str) -> nn.Module:
    """``avgpool`` (:class:`AvgPool2x2`, an ``nn.AvgPool2d(2, 2)``) | ``maxpool``: a 2x2 stride-2
    pooling layer (``none`` is the caller's)."""
    check_choice("pooling", kind, POOLINGS[:-1])
    return AvgPool2x2() if kind == "avgpool" else nn.MaxPool2d(2, 2)


# --------------------------------------------------------------------------- initialisation


def _fan_in(weight: torch.Tensor) -> int:
    """``in_features`` (Linear) or ``in_channels/groups * kh * kw`` (Conv)."""
    return int(weight.shape[1] * math.prod(weight.shape[2:]))


def _draw(param: torch.Tensor, generator: torch.Generator, fill: Callable[[torch.Tensor], object]) -> None:
    """Apply the in-place random ``fill`` to ``param``, via a buffer on the generator's device
    when ``param`` lives elsewhere (e.g. a CUDA model re-drawn from a CPU generator)."""
    if param.device == generator.device:
        fill(param)
        return
    tmp = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
    fill(tmp)
    param.copy_(tmp)


@torch.no_grad()
def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every parameter of ``model`` from ``generator`` with PyTorch's default schemes.

    Conv/Linear weights: ``kaiming_uniform_(a=sqrt(5))``; their biases ``U(-1/sqrt(fan_in),
    1/sqrt(fan_in))``; norm layers: weight 1, bias 0 (BatchNorm running statistics reset). The
    global RNG is not touched. Parameters on another device than ``generator`` are drawn on the
    generator's device and copied (the numbers depend only on the generator).

    Raises:
        ConfigError: a module owns parameters of a kind this function does not know.
    """
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            _draw(
                module.weight,
                generator,
                partial(nn.init.kaiming_uniform_, a=math.sqrt(5), generator=generator),
            )
            if module.bias is not None:
                fan_in = _fan_in(module.weight)
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                _draw(
                    module.bias, generator, partial(nn.init.uniform_, a=-bound, b=bound, generator=generator)
                )
        elif isinstance(module, _NORMS):
            module.reset_parameters()  # deterministic: ones / zeros (+ running stats)
        elif own:
            raise ConfigError(
                f"cannot initialise module {name!r} of type {type(module).__name__}: "
                f"init_parameters knows Linear, Conv and norm layers"
            )
    return model
