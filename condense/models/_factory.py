"""The model registry and ``create_model``.

A registered builder is a function ``build(channels, num_classes, im_size, *, kw=default, ...)``
returning a :class:`~condense.models._base.ClassifierNet`; its keyword-only parameters are the
model's valid kwargs. Weight initialisation from a generator is done here, not in the builders.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from condense.errors import ConfigError
from condense.models._base import ClassifierNet, as_pair, check_positive, init_parameters
from condense.registry import Registry

logger = logging.getLogger(__name__)

Builder = Callable[..., ClassifierNet]

MODELS: Registry[Builder] = Registry("model")


def model_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments model ``name`` accepts, with their defaults.

    Raises:
        UnknownNameError: ``name`` is not registered (message lists the valid choices).
    """
    sig = inspect.signature(MODELS.get(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def model_factory(name: str, spec: Any, device: torch.device | str = "cpu",
                  **kwargs: Any) -> Callable[[torch.Generator], nn.Module]:
    """``make(generator) -> model``: a fresh ``name`` network for ``spec`` (a
    :class:`~condense.types.DatasetSpec`: channels, classes, image size) on ``device``, its weights
    drawn from ``generator`` (what :func:`condense.train.fit` calls once per seed)."""

    def make(g: torch.Generator) -> nn.Module:
        return create_model(name, spec.channels, spec.num_classes, spec.im_size, generator=g, **kwargs).to(device)

    return make


def create_model(
    name: str,
    channels: int,
    num_classes: int,
    im_size: tuple[int, int] | int,
    *,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> ClassifierNet:
    """Build a zoo network by registry name.

    Args:
        name: registry key, e.g. ``convnet``, ``convnet_bn``, ``resnet18`` (see ``MODELS.names()``).
        channels: input channels ``C``.
        num_classes: number of logits.
        im_size: ``(H, W)`` or ``H`` for square inputs.
        generator: when given, every parameter is drawn from it (PyTorch's default init schemes,
            no global RNG use) and the model lives on ``generator.device``; the same generator
            state gives identical weights. ``None``: PyTorch's usual global-RNG init on CPU.
        **kwargs: model options (e.g. ``width``, ``depth``, ``norm`` for ``convnet``).

    Returns:
        The network, in train mode; ``forward(x: (N, C, H, W)) -> (N, num_classes)``.

    Raises:
        UnknownNameError: unknown ``name`` (lists valid choices).
        ConfigError: an unknown kwarg for this model (lists valid kwargs) or a bad value.
    """
    builder = MODELS.get(name)
    valid = model_kwargs(name)
    for key in kwargs:
        if key not in valid:
            listing = ", ".join(valid) if valid else "(none)"
            raise ConfigError(f"unknown kwarg {key!r} for model {name!r}; valid kwargs: {listing}")
    check_positive("channels", channels)
    check_positive("num_classes", num_classes)
    size = as_pair(im_size)
    if generator is None:
        return builder(channels, num_classes, size, **kwargs)
    with torch.device("meta"):  # allocate nothing and draw nothing until init_parameters
        model = builder(channels, num_classes, size, **kwargs)
    model.to_empty(device=generator.device)
    init_parameters(model, generator)
    logger.debug("built %s (%d parameters) from a generator", name, count_parameters(model))
    return model


def reinitialize(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw ``model``'s parameters in place from ``generator`` (a fresh random network, as
    distribution matching samples every iteration, without re-allocating). Returns ``model``.
    """
    return init_parameters(model, generator)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
