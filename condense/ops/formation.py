"""How a stored synthetic slot turns into training images: plain pixels or IDC's multi-formation.

A :class:`Decoder` is the one implementation every matcher composes with (DC, DSA, DM, DataDAM,
the trajectory family); methods never decode by hand. ``pixels`` is the identity. ``multi``
(Kim et al., ICML 2022, "multi-formation") splits each stored ``(C, H, W)`` image into a
``factor x factor`` grid of tiles and upsamples every tile back to ``H x W`` (bilinear,
differentiable): one stored image yields ``factor^2`` training images of its class at the same
storage cost, trading resolution for count.

Layout: slot-major. Decoded row ``n * factor^2 + t`` is tile ``t`` (row-major over the grid) of
stored row ``n``, so a class-major stored set stays class-major once decoded and the labels are
``labels.repeat_interleave(factor^2)``. When ``H`` or ``W`` is not a multiple of ``factor``
(28 / 3) the tiles differ by one pixel (``torch.tensor_split``: 10, 9, 9); IDC pads instead.

:meth:`Decoder.encode` is the initialisation's inverse direction: ``factor^2`` images per slot,
each area-downsampled into its tile (real-image initialisation of a multi-formation set).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from condense.errors import ConfigError

#: Parametrizations of the stored set (``param=...``).
PARAMS = ("pixels", "multi")
#: Tile upsampling modes of ``multi``.
MODES = ("bilinear", "nearest", "bicubic")
MAX_FACTOR = 8


@dataclass(frozen=True)
class Decoder:
    """A stored set's parametrization.

    Attributes:
        kind: ``pixels`` (identity) or ``multi`` (factor x factor tiles, each upsampled).
        factor: tiles per side (``multi``: 2..8; ``pixels``: 1).
        mode: the upsampling of ``multi`` (bilinear, as IDC).
    """

    kind: str = "pixels"
    factor: int = 1
    mode: str = "bilinear"

    def __post_init__(self) -> None:
        if self.kind not in PARAMS:
            raise ConfigError(f"unknown param {self.kind!r}; valid choices: {', '.join(PARAMS)}")
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, int):
            raise ConfigError(f"param.factor must be an integer, got {f!r}")
        if self.kind == "pixels" and f != 1:
            raise ConfigError(f"param=pixels has factor 1, got param.factor={f}; use param=multi for factor > 1")
        if self.kind == "multi" and not 2 <= f <= MAX_FACTOR:
            raise ConfigError(f"invalid param.factor={f} for param=multi; valid: 2..{MAX_FACTOR}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown param.mode {self.mode!r}; valid choices: {', '.join(MODES)}")

    @property
    def identity(self) -> bool:
        return self.kind == "pixels"

    @property
    def label(self) -> str:
        """``""`` for pixels, else ``multi<factor>`` (``-<mode>`` unless bilinear): record paths, rows."""
        if self.identity:
            return ""
        return f"multi{self.factor}" + ("" if self.mode == "bilinear" else f"-{self.mode}")

    @property
    def per_slot(self) -> int:
        """Training images one stored image yields (``factor^2``)."""
        return self.factor * self.factor

    def check_size(self, im_size: tuple[int, int]) -> None:
        """Tiles of at least 2 pixels a side, else a one-line :class:`ConfigError`."""
        if not self.identity and min(im_size) < 2 * self.factor:
            raise ConfigError(f"param.factor={self.factor} is too large for {im_size[0]}x{im_size[1]} images "
                              f"(tiles under 2 pixels); valid: 2..{min(im_size) // 2}")

    def decode(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` stored -> ``(N * factor^2, C, H, W)`` training images (differentiable)."""
        if self.identity:
            return x
        n, c, h, w = x.shape
        tiles = [t for band in torch.tensor_split(x, self.factor, dim=2)
                 for t in torch.tensor_split(band, self.factor, dim=3)]
        kw = {"align_corners": False} if self.mode != "nearest" else {}
        up = [F.interpolate(t, size=(h, w), mode=self.mode, **kw) for t in tiles]
        return torch.stack(up, dim=1).reshape(n * self.per_slot, c, h, w)

    def decode_labels(self, labels: Tensor) -> Tensor:
        """Labels of :meth:`decode`'s rows: each slot's label repeated ``factor^2`` times."""
        return labels if self.identity else labels.repeat_interleave(self.per_slot, dim=0)

    def encode(self, x: Tensor) -> Tensor:
        """``(N * factor^2, C, H, W)`` full-size images -> ``(N, C, H, W)`` slots: image
        ``n * factor^2 + t`` area-downsampled into tile ``t`` of slot ``n`` (initialisation)."""
        if self.identity:
            return x
        m, c, h, w = x.shape
        if m % self.per_slot:
            raise ConfigError(f"encode needs a multiple of factor^2={self.per_slot} images, got {m}")
        n = m // self.per_slot
        groups = x.reshape(n, self.per_slot, c, h, w)
        hs = [t.shape[0] for t in torch.tensor_split(torch.empty(h), self.factor)]
        ws = [t.shape[0] for t in torch.tensor_split(torch.empty(w), self.factor)]
        rows = []
        for i, th in enumerate(hs):
            cols = [F.interpolate(groups[:, i * self.factor + j], size=(th, tw), mode="area")
                    for j, tw in enumerate(ws)]
            rows.append(torch.cat(cols, dim=3))
        return torch.cat(rows, dim=2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_label(cls, label: str) -> Decoder:
        """The inverse of :attr:`label` (``"pixels"`` or ``""`` -> pixels; ``multi3``; ``multi2-nearest``).

        Raises:
            ConfigError: not such a label (one line with the valid forms).
        """
        if label in ("", "pixels"):
            return cls()
        m = re.fullmatch(r"multi(\d+)(?:-([a-z]+))?", str(label))
        if m is None:
            raise ConfigError(f"unknown param label {label!r}; valid: pixels, multi<factor>[-<mode>] "
                              f"(factor 2..{MAX_FACTOR}, mode {'|'.join(MODES)}), e.g. multi2")
        return cls("multi", int(m.group(1)), m.group(2) or "bilinear")

    def overrides(self) -> list[str]:
        """The CLI overrides that select this parametrization."""
        if self.identity:
            return []
        return ["param=multi", f"param.factor={self.factor}"] + ([] if self.mode == "bilinear" else [f"param.mode={self.mode}"])

    @classmethod
    def from_dict(cls, d: Any) -> Decoder:
        """From :meth:`to_dict` (or a config mapping with ``kind``/``factor``/``mode``).

        Raises:
            ConfigError: not a mapping, unknown keys, or a bad value (one line).
        """
        if d is None:
            return cls()
        if not hasattr(d, "keys"):
            raise ConfigError(f"a parametrization is a mapping with kind/factor/mode, got {d!r}")
        extra = set(d.keys()) - {"kind", "factor", "mode"}
        if extra:
            raise ConfigError(f"unknown parametrization keys {sorted(extra)}; valid: kind, factor, mode")
        return cls(kind=d.get("kind", "pixels"), factor=d.get("factor", 1), mode=d.get("mode", "bilinear"))


PIXELS = Decoder()


def set_decoder(syn: Any) -> Decoder:
    """The decoder a :class:`~condense.types.SyntheticSet` records (``meta.extra["decoder"]``), else pixels."""
    return Decoder.from_dict(syn.meta.extra.get("decoder"))


def decoded_set(syn: Any) -> Any:
    """The training images of a set: decoded images and repeated labels (the set itself when it is
    plain pixels). The copy's ``meta.extra`` drops ``decoder`` and records ``decoded_from``
    (the decoder and the stored image count), so it is never decoded twice."""
    dec = set_decoder(syn)
    if dec.identity:
        return syn
    extra = {k: v for k, v in syn.meta.extra.items() if k != "decoder"}
    extra["decoded_from"] = {**dec.to_dict(), "stored_images": int(syn.images.shape[0])}
    meta = dataclasses.replace(syn.meta, extra=extra)
    with torch.no_grad():
        images = dec.decode(syn.images.detach())
    return dataclasses.replace(syn, images=images, labels=dec.decode_labels(syn.labels.detach()), meta=meta)
