"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

Usage is two-phase: :meth:`DSA.sample` draws an operation and its per-sample parameters from
a ``torch.Generator``; :meth:`DSA.apply` applies exactly those parameters to any batch. Sample
once, apply to the real and to the synthetic batch of a class, and image ``i`` of both batches
gets the same transform (the "siamese" property), whatever the two batch sizes.

Like the reference code's single-operation mode, each call picks ONE operation from the
strategy (``color`` counts as one: brightness, saturation, contrast in sequence).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from condense.augment import _ops
from condense.errors import ConfigError

logger = logging.getLogger(__name__)

VALID_OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
NO_FLIP_DATASETS = frozenset({"mnist", "svhn"})
_NONE_STRATEGIES = frozenset({"", "none"})

# Parameter fields of DSAParams that hold tensors, in a fixed order.
_TENSOR_FIELDS: tuple[str, ...] = (
    "first_flip",
    "flip",
    "brightness",
    "saturation",
    "contrast",
    "crop",
    "cutout",
    "scale",
    "rotate",
)


def default_strategy(dataset_name: str) -> str:
    """The DSA strategy the papers use for a dataset: no ``flip`` for MNIST and SVHN.

    Args:
        dataset_name: e.g. ``"fashion_mnist"``, ``"mnist"``, ``"cifar10"`` (case-insensitive).
    """
    if dataset_name.lower() in NO_FLIP_DATASETS:
        return "_".join(op for op in DEFAULT_STRATEGY.split("_") if op != "flip")
    return DEFAULT_STRATEGY


@dataclass
class DSAParams:
    """One sampled DSA transform: the operation name and its per-sample parameters.

    Every tensor has leading shape ``S``: ``(n,)`` from :meth:`DSA.sample` or
    ``(num_groups, n)`` from :meth:`DSA.sample_per_group`. Fields the operation does not use
    are ``None``.

    Attributes:
        op: the chosen operation (one of ``VALID_OPS``, or ``"none"`` when nothing was left
            to choose from).
        n: number of distinct per-sample transforms; image ``i`` uses entry ``i % n``.
        num_groups: ``None`` for ungrouped parameters, else the group count ``K``.
        first_flip: ``S`` bool, the FYI flip applied before ``op`` (only with ``flip_first``).
        flip: ``S`` bool, op ``flip``.
        brightness: ``S`` additive offsets, op ``color``.
        saturation: ``S`` factors, op ``color``.
        contrast: ``S`` factors, op ``color``.
        crop: ``S + (2,)`` uniform draws in ``[0, 1)`` for the (row, column) shift; they are
            turned into integer pixel shifts at apply time, from the image size
            (:meth:`DSA.crop_shift`), so the same parameters fit any resolution.
        cutout: ``S + (2,)`` uniform draws in ``[0, 1)`` for the (row, column) box centre,
            turned into pixels at apply time (:meth:`DSA.cutout_centre`).
        scale: ``S + (2,)`` factors ``(sx, sy)``, op ``scale``.
        rotate: ``S`` angles in degrees, op ``rotate``.
    """

    op: str
    n: int
    num_groups: int | None = None
    first_flip: Tensor | None = None
    flip: Tensor | None = None
    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    crop: Tensor | None = None
    cutout: Tensor | None = None
    scale: Tensor | None = None
    rotate: Tensor | None = None

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The ``(name, tensor)`` pairs that are set."""
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def map(self, fn: Callable[[Tensor], Tensor], **changes: int | None) -> DSAParams:
        """A copy with ``fn`` applied to every tensor (and the given scalar fields replaced)."""
        new = {name: fn(t) for name, t in self.tensors()}
        return dataclasses.replace(self, **new, **changes)

    def to(self, device: torch.device | str) -> DSAParams:
        """A copy with every tensor on ``device``."""
        return self.map(lambda t: t.to(device))

    def group(self, k: int) -> DSAParams:
        """The ungrouped parameters of group ``k`` (grouped parameters only)."""
        if self.num_groups is None:
            raise ValueError("group() needs parameters from DSA.sample_per_group")
        if not 0 <= k < self.num_groups:
            raise IndexError(f"group {k} out of range for {self.num_groups} groups")
        return self.map(lambda t: t[k], num_groups=None)

    @property
    def device(self) -> torch.device | None:
        """Device of the tensors (``None`` if there are none)."""
        for _, t in self.tensors():
            return t.device
        return None


@dataclass(frozen=True)
class DSA:
    """Differentiable siamese augmentation: one random operation per call.

    Ops (per sample): ``flip`` mirrors horizontally with probability ``prob_flip``; ``scale``
    resamples with factors ``sx, sy ~ U[1/ratio_scale, ratio_scale]``; ``rotate`` by
    ``U[-ratio_rotate, ratio_rotate]`` degrees; ``crop`` translates by integers up to
    ``round(ratio_crop_pad * H)`` (and ``* W``) pixels with zero fill; ``cutout`` zeroes a box
    of side ``round(ratio_cutout * H)`` (and ``* W``) at a random centre, clipped at the
    border; ``color`` = brightness ``+ (U[0,1) - 0.5) * brightness``, then saturation
    ``* U[0,1) * saturation`` around the channel mean, then contrast
    ``* (U[0,1) + contrast)`` around the image mean. ``round`` rounds halves up.

    Scale and rotate use ``affine_grid`` / ``grid_sample`` (bilinear, zero padding). The
    reference code calls them without ``align_corners``, which on torch >= 1.3 means
    ``False``; that is the default here too.

    Args:
        strategy: ops joined by ``_``; ``"none"`` (or ``""``) disables augmentation.
        flip_first: FYI mode: ``flip`` leaves the choice set; every call flips each image with
            probability ``prob_flip`` first, then applies one op drawn from the rest.
        prob_flip, ratio_scale, ratio_rotate, ratio_crop_pad, ratio_cutout, brightness,
            saturation, contrast: op strengths, defaults as in the paper.
        align_corners: for the affine ops.

    Raises:
        ConfigError: unknown op in ``strategy`` or an out-of-range strength.
    """

    strategy: str = DEFAULT_STRATEGY
    flip_first: bool = False
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    align_corners: bool = False

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in VALID_OPS]
        if bad:
            raise ConfigError(
                f"unknown DSA op(s) {', '.join(repr(b) for b in bad)} in strategy "
                f"{self.strategy!r}; valid ops: {', '.join(VALID_OPS)} (joined by '_'), "
                "or 'none'"
            )
        self._check_range("prob_flip", 0.0, 1.0)
        self._check_range("ratio_scale", 1.0, math.inf)
        self._check_range("ratio_rotate", 0.0, 180.0)
        self._check_range("ratio_crop_pad", 0.0, 1.0)
        self._check_range("ratio_cutout", 0.0, 1.0)
        self._check_range("brightness", 0.0, math.inf)
        self._check_range("saturation", 0.0, math.inf)
        self._check_range("contrast", 0.0, math.inf)
        logger.debug("DSA ops %s (flip_first=%s)", self.choices, self.flip_first)

    def _check_range(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        if not low <= value <= high:
            raise ConfigError(f"DSA {name}={value!r} is out of range; valid: [{low}, {high}]")

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops named by ``strategy`` (in order, duplicates kept)."""
        if self.strategy.strip().lower() in _NONE_STRATEGIES:
            return ()
        return tuple(self.strategy.split("_"))

    @property
    def choices(self) -> tuple[str, ...]:
        """The ops one call chooses from (``flip`` removed in ``flip_first`` mode)."""
        if self.flip_first:
            return tuple(op for op in self.ops if op != "flip")
        return self.ops

    # ------------------------------------------------------------------ sampling

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> DSAParams:
        """Choose one op and draw its parameters for ``n`` samples.

        Draws, all from ``generator`` and in this order: one integer for the op (skipped when
        there is nothing to choose), ``n`` uniforms for the FYI flip (``flip_first`` only),
        then a fixed number per op (``color`` 3n, ``crop``/``cutout``/``scale`` 2n,
        ``flip``/``rotate`` n). Same generator state -> same parameters.

        Args:
            n: number of distinct per-sample transforms (``1``: one transform for the batch).
            generator: the source of randomness.
            device: where the returned tensors live (default: the generator's device).

        Returns:
            :class:`DSAParams` with leading shape ``(n,)``.
        """
        return self._sample((n,), generator, device)

    def sample_per_group(
        self,
        num_groups: int,
        n: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> DSAParams:
        """Like :meth:`sample` but with independent parameters for ``num_groups`` groups.

        One op is drawn and shared by all groups; each group gets its own per-sample
        parameters. The reference code draws a separate op for every class; sharing the op
        across the classes of one iteration is our choice so that all classes can be
        augmented in one batched call (:meth:`apply_grouped`).

        Returns:
            :class:`DSAParams` with leading shape ``(num_groups, n)``.
        """
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        return self._sample((num_groups, n), generator, device)

    def _sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator,
        device: torch.device | str | None,
    ) -> DSAParams:
        n = shape[-1]
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        gdev = generator.device

        def uniform(*extra: int) -> Tensor:
            return torch.rand(shape + extra, generator=generator, device=gdev)

        choices = self.choices
        op = "none"
        if choices:
            k = int(torch.randint(len(choices), (1,), generator=generator, device=gdev).item())
            op = choices[k]
        fields: dict[str, Tensor] = {}
        if self.flip_first:
            fields["first_flip"] = uniform() < self.prob_flip
        if op == "flip":
            fields["flip"] = uniform() < self.prob_flip
        elif op == "color":
            fields["brightness"] = (uniform() - 0.5) * self.brightness
            fields["saturation"] = uniform() * self.saturation
            fields["contrast"] = uniform() + self.contrast
        elif op in ("crop", "cutout"):
            fields[op] = uniform(2)
        elif op == "scale":
            low = 1.0 / self.ratio_scale
            fields["scale"] = uniform(2) * (self.ratio_scale - low) + low
        elif op == "rotate":
            fields["rotate"] = (uniform() - 0.5) * (2.0 * self.ratio_rotate)
        if device is not None:
            fields = {k: v.to(device) for k, v in fields.items()}
        num_groups = shape[0] if len(shape) == 2 else None
        return DSAParams(op=op, n=n, num_groups=num_groups, **fields)

    # ------------------------------------------------------------------ pixel geometry

    def crop_max_shift(self, height: int, width: int) -> tuple[int, int]:
        """Largest translation in pixels, ``(round(ratio*H), round(ratio*W))``."""
        return (
            _ops.half_up(height * self.ratio_crop_pad),
            _ops.half_up(width * self.ratio_crop_pad),
        )

    def cutout_size(self, height: int, width: int) -> tuple[int, int]:
        """Cutout box ``(round(ratio*H), round(ratio*W))``."""
        return (
            _ops.half_up(height * self.ratio_cutout),
            _ops.half_up(width * self.ratio_cutout),
        )

    def crop_shift(self, u: Tensor, height: int, width: int) -> Tensor:
        """Integer ``(dy, dx)`` shifts, uniform on ``[-s, s]`` per axis, from draws ``u``.

        Args:
            u: ``(..., 2)`` uniforms in ``[0, 1)`` (``DSAParams.crop``).

        Returns:
            ``(..., 2)`` int64; ``out[i, j] = x[i + dy, j + dx]``.
        """
        smax = torch.tensor(self.crop_max_shift(height, width), device=u.device)
        return _uniform_int(u, 2 * smax + 1) - smax

    def cutout_centre(self, u: Tensor, height: int, width: int) -> Tensor:
        """Integer ``(cy, cx)`` box centres from draws ``u``.

        As in the reference, the centre is uniform on ``[0, H]`` for an even box side and on
        ``[0, H - 1]`` for an odd one (likewise for the width).

        Args:
            u: ``(..., 2)`` uniforms in ``[0, 1)`` (``DSAParams.cutout``).

        Returns:
            ``(..., 2)`` int64.
        """
        sh, sw = self.cutout_size(height, width)
        counts = torch.tensor([height + 1 - sh % 2, width + 1 - sw % 2], device=u.device)
        return _uniform_int(u, counts)

    # ------------------------------------------------------------------ applying

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Apply ``params`` to a batch; image ``i`` uses ``params[i % params.n]``.

        Args:
            x: ``(B, C, H, W)``, any ``B``.
            params: ungrouped parameters from :meth:`sample` (moved to ``x``'s device).

        Returns:
            ``(B, C, H, W)``, differentiable w.r.t. ``x``.
        """
        if x.dim() != 4:
            raise ValueError(f"DSA.apply expects (B, C, H, W), got shape {tuple(x.shape)}")
        if params.num_groups is not None:
            raise ValueError(
                f"params were sampled for {params.num_groups} groups; use apply_grouped "
                "with x of shape (K, B, C, H, W)"
            )
        idx = torch.arange(x.shape[0], device=x.device) % params.n
        flat = params.to(x.device).map(lambda t: t.index_select(0, idx), n=x.shape[0])
        return self._apply_flat(x, flat)

    def apply_grouped(self, x: Tensor, params: DSAParams) -> Tensor:
        """Apply per-group parameters; sample ``i`` of group ``k`` uses ``params[k, i % n]``.

        Ungrouped parameters (from :meth:`sample`) are shared by every group.

        Args:
            x: ``(K, B, C, H, W)``.
            params: from :meth:`sample_per_group` with ``num_groups == K`` (or :meth:`sample`).

        Returns:
            ``(K, B, C, H, W)``, differentiable w.r.t. ``x``.
        """
        if x.dim() != 5:
            raise ValueError(
                f"DSA.apply_grouped expects (K, B, C, H, W), got shape {tuple(x.shape)}"
            )
        k, b = x.shape[:2]
        if params.num_groups is not None and params.num_groups != k:
            raise ValueError(f"params have {params.num_groups} groups but x has {k} (dim 0)")
        idx = torch.arange(b, device=x.device) % params.n

        def expand(t: Tensor) -> Tensor:
            if params.num_groups is None:
                t = t.index_select(0, idx).unsqueeze(0).expand(k, *([-1] * t.dim()))
            else:
                t = t.index_select(1, idx)
            return t.reshape(k * b, *t.shape[2:])

        flat = params.to(x.device).map(expand, n=k * b, num_groups=None)
        out = self._apply_flat(x.reshape(k * b, *x.shape[2:]), flat)
        return out.view(x.shape)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Sample a fresh transform per image and apply it (non-siamese use).

        Args:
            x: ``(B, C, H, W)``.
            generator: the source of randomness.
        """
        return self.apply(x, self.sample(x.shape[0], generator, device=x.device))

    def _apply_flat(self, x: Tensor, p: DSAParams) -> Tensor:
        """``x`` ``(B, C, H, W)`` and parameters with leading shape exactly ``(B,)``."""
        if p.first_flip is not None:
            x = _ops.hflip(x, p.first_flip)
        h, w = x.shape[-2:]
        if p.op == "flip":
            x = _ops.hflip(x, _need(p.flip, p.op))
        elif p.op == "color":
            x = _ops.brightness(x, _need(p.brightness, p.op))
            x = _ops.saturation(x, _need(p.saturation, p.op))
            x = _ops.contrast(x, _need(p.contrast, p.op))
        elif p.op == "crop":
            x = _ops.translate(x, self.crop_shift(_need(p.crop, p.op), h, w))
        elif p.op == "cutout":
            centre = self.cutout_centre(_need(p.cutout, p.op), h, w)
            x = _ops.cutout(x, centre, self.cutout_size(h, w))
        elif p.op == "scale":
            x = _ops.affine(x, _ops.scale_theta(_need(p.scale, p.op)), self.align_corners)
        elif p.op == "rotate":
            x = _ops.affine(x, _ops.rotate_theta(_need(p.rotate, p.op)), self.align_corners)
        elif p.op != "none":
            raise ConfigError(f"unknown DSA op {p.op!r}; valid ops: {', '.join(VALID_OPS)}")
        return x


def _need(t: Tensor | None, op: str) -> Tensor:
    if t is None:
        raise ValueError(f"DSAParams for op {op!r} lack that op's parameters")
    return t


def _uniform_int(u: Tensor, counts: Tensor) -> Tensor:
    """Map uniforms in ``[0, 1)`` to integers uniform on ``[0, counts)`` (per last axis)."""
    counts = counts.to(u.device)
    k = torch.floor(u.float() * counts.float()).long()
    return torch.minimum(k, counts - 1).clamp_min(0)
