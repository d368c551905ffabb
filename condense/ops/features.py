"""Intermediate feature maps: a forward-hook context manager and the spatial attention map.

- :func:`capture_features` hooks modules (by default ``model.feature_modules()``), records their
  outputs (optionally reduced on the fly by ``transform``) and always removes its hooks.
- :func:`attention_map` DataDAM's spatial attention ``sum_c |f_c|^p``, flattened, L2-normalised.
- :func:`resolve_layers` turns layer indices (negative allowed, ``None`` = all but the last) into
  the modules to hook; :func:`pre_pool` moves a hook in front of a block's trailing pooling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from condense.errors import ConfigError

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


def feature_modules(model: nn.Module) -> list[nn.Module]:
    """``model.feature_modules()`` as a list, with a clear error for models that lack it."""
    fn = getattr(model, "feature_modules", None)
    if fn is None:
        raise ConfigError(
            f"model {type(model).__name__} has no feature_modules(); feature/attention matching "
            "needs a condense.models network (they all define it)"
        )
    return list(fn())


def resolve_layers(modules: Sequence[nn.Module], layers: Sequence[int] | None) -> list[nn.Module]:
    """Pick modules by index.

    Args:
        modules: the candidate modules, in forward order (e.g. ``feature_modules(model)``).
        layers: indices into ``modules`` (negative count from the end); ``None`` means every
            module but the last (DataDAM's default: the last block is matched via the embedding).

    Returns:
        The selected modules in the order of ``layers`` (forward order for ``None``).
    """
    n = len(modules)
    if layers is None:
        return list(modules[: max(n - 1, 0)])
    out = []
    for i in layers:
        if not -n <= int(i) < n:
            raise ConfigError(
                f"layer index {i} out of range: the model has {n} feature modules; "
                f"valid indices are {-n}..{n - 1}"
            )
        out.append(modules[int(i)])
    return out


_POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def pre_pool(module: nn.Module) -> nn.Module:
    """The module whose output enters a block's trailing pooling layer, else the block itself.

    For an ``nn.Sequential`` block ending in a 2-D pooling layer (ConvNet, AlexNet, VGG, LeNet
    blocks) this is the layer before the pool (the activation), so its output is the block's
    map before pooling: where DataDAM's code takes its attention maps (ReLU outputs).
    """
    if isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[-1], _POOLS):
        return module[-2]
    return module


@contextmanager
def capture_features(
    model: nn.Module,
    modules: Sequence[nn.Module] | None = None,
    *,
    transform: Transform | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Record the outputs of ``modules`` during forwards of ``model``.

    Each hooked call appends one tensor to the yielded list, in call order (so one forward of a
    sequential network gives one entry per module, in ``modules``' forward order). ``transform``
    is applied inside the hook, which lets large maps be reduced before they are kept (and keeps
    a reference to the reduced tensor only). Without ``transform`` the raw output is kept as is:
    it stays on the autograd graph; a later in-place op on it would be caught by autograd.

    The hooks are removed when the block exits, also on exceptions.

    Args:
        model: the network (used to check the modules belong to it).
        modules: modules to hook; ``None`` = ``model.feature_modules()``.
        transform: optional ``(N, ...) -> (N, ...)`` applied to each output.

    Yields:
        The list that fills up; clear it between forwards (``feats.clear()``).
    """
    mods = feature_modules(model) if modules is None else list(modules)
    owned = {id(m) for m in model.modules()}
    for m in mods:
        if id(m) not in owned:
            raise ConfigError(f"module {type(m).__name__} is not a submodule of {type(model).__name__}")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"feature module {type(module).__name__} returned {type(output).__name__}; "
                "only modules that return a single tensor can be captured"
            )
        captured.append(output if transform is None else transform(output))

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def attention_map(f: torch.Tensor, power: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """DataDAM spatial attention of a feature map.

    ``a = sum_c |f_c|^p`` over channels, flattened over the spatial positions and L2-normalised
    per sample. Computed in float32 (or float64 if ``f`` is) whatever the autocast dtype of ``f``,
    since ``|f|^p`` with p = 4 loses most of its precision in bfloat16.

    Args:
        f: ``(N, C, *spatial)`` feature map (at least one spatial dim).
        power: the exponent ``p`` (> 0).
        eps: floor of the norm (as ``F.normalize``).

    Returns:
        ``(N, prod(spatial))`` attention vectors of unit L2 norm (zero where ``f`` is zero).
    """
    if f.dim() < 3:
        raise ConfigError(
            f"attention needs a spatial feature map (N, C, H, W); got shape {tuple(f.shape)}: "
            "choose feature layers with spatial outputs"
        )
    if power <= 0:
        raise ConfigError(f"attention power must be > 0; got {power}")
    if f.dtype not in (torch.float32, torch.float64):
        f = f.float()
    return F.normalize(_channel_power_sum(f, power).flatten(1), p=2.0, dim=1, eps=eps)


def _channel_power_sum(f: torch.Tensor, power: float) -> torch.Tensor:
    """``sum_c |f_c|^p`` over dim 1; even integer powers by squaring (no abs, no generic pow:
    about 1.6x faster on a CPU for p = 4, the same values up to rounding)."""
    if power == 1:
        return f.abs().sum(1)
    if float(power).is_integer() and int(power) % 2 == 0:
        a = f.square()
        half = int(power) // 2
        if half == 2:
            a = a.square()
        elif half > 2:
            a = a.pow(half)
        return a.sum(1)
    return f.abs().pow(power).sum(1)
