"""Batched, replayable crop augmentations: random resized crops, flips, CutMix and shift jitter.

Every augmentation is split into ``sample_*`` (draw the parameters from a ``torch.Generator``)
and an apply function (pure, differentiable in the images). The split lets a caller replay the
exact same augmentation (FKD-style stored labels regenerate their crops from a seed) and apply
one draw to several batches. Used by the teacher-based recovery methods (SRe2L / CDA crops and
jitter, RDED's candidate crops) and the soft-label evaluation protocol.

Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates, the edges of the crop (a full image is
``(0, 0, W, H)``); crops are resampled bilinearly with ``torchvision.ops.roi_align``
(``aligned=True``: pixel ``i`` has its centre at ``i + 0.5``), which averages several samples per
output pixel where a crop is shrunk, and is differentiable in the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Draws per image before falling back to a centre crop (torchvision's RandomResizedCrop).
CROP_ATTEMPTS = 10


def _check_range(name: str, lo_hi: tuple[float, float], low: float, high: float | None) -> tuple[float, float]:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if not (low < lo <= hi and (high is None or hi <= high)):
        bound = f"{low} < lo <= hi" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must satisfy {bound}, got {lo_hi!r}")
    return lo, hi


def sample_resized_crops(n: int, height: int, width: int, *, scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator,
                         device: torch.device | str = "cpu") -> Tensor:
    """``(n, 4)`` float boxes drawn as torchvision's ``RandomResizedCrop`` draws them.

    Per image: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), integer width and height
    rounded from them; the first of :data:`CROP_ATTEMPTS` draws that fits the image is placed at a
    uniform integer offset; if none fits, a centre crop with the aspect ratio clamped to ``ratio``.

    Args:
        n: boxes to draw.
        height / width: the image size in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        generator: the source of randomness (its device decides where the draws happen).
    """
    s_lo, s_hi = _check_range("scale", scale, 0.0, 1.0)
    r_lo, r_hi = _check_range("ratio", ratio, 0.0, None)
    gdev = generator.device
    area = float(height * width)
    u = torch.rand(n, CROP_ATTEMPTS, 4, generator=generator, device=gdev, dtype=torch.float64)
    target = area * (s_lo + (s_hi - s_lo) * u[..., 0])
    aspect = torch.exp(math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=gdev))
    rows = torch.arange(n, device=gdev)
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    y0 = torch.floor(u[rows, pick, 2] * (height - h + 1)).clamp(max=height - h)
    x0 = torch.floor(u[rows, pick, 3] * (width - w + 1)).clamp(max=width - w)
    # fallback: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    if in_ratio < r_lo:
        fw, fh = float(width), float(round(width / r_lo))
    elif in_ratio > r_hi:
        fw, fh = float(round(height * r_hi)), float(height)
    else:
        fw, fh = float(width), float(height)
    miss = first < 0
    w = torch.where(miss, torch.full_like(w, fw), w)
    h = torch.where(miss, torch.full_like(h, fh), h)
    x0 = torch.where(miss, torch.full_like(x0, float((width - fw) // 2)), x0)
    y0 = torch.where(miss, torch.full_like(y0, float((height - fh) // 2)), y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1).to(device=device, dtype=torch.float32)


def resized_crop(x: Tensor, boxes: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Each image's box resampled to ``size`` (default: the input size); differentiable in ``x``.

    Args:
        x: ``(n, C, H, W)`` images.
        boxes: ``(n, 4)`` ``(x0, y0, x1, y1)`` pixel edges, one box per image.
        size: ``(h, w)`` of the output.
    """
    from torchvision.ops import roi_align

    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"boxes must be ({x.shape[0]}, 4), one per image; got {tuple(boxes.shape)}")
    out = (int(x.shape[-2]), int(x.shape[-1])) if size is None else (int(size[0]), int(size[1]))
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    idx = torch.arange(x.shape[0], device=x.device, dtype=dtype)[:, None]
    rois = torch.cat([idx, boxes.to(x.device, dtype)], 1)
    y = roi_align(x.to(dtype), rois, out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return y.to(x.dtype)


def sample_flips(n: int, *, generator: torch.Generator, device: torch.device | str = "cpu",
                 p: float = 0.5) -> Tensor:
    """``(n,)`` bool: which images to mirror left-right (each with probability ``p``)."""
    return (torch.rand(n, generator=generator, device=generator.device) < p).to(device)


def flip(x: Tensor, flags: Tensor) -> Tensor:
    """``x`` with the images where ``flags`` is true mirrored left-right."""
    return torch.where(flags.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


@dataclass(frozen=True)
class CutMix:
    """One CutMix draw for a batch: rows inside ``box`` come from ``x[perm]``.

    Attributes:
        perm: ``(n,)`` the partner of each image.
        box: ``(x0, y0, x1, y1)`` integer pixel edges (may be empty).
        lam: the fraction of each image left untouched, ``1 - box area / image area``.
    """

    perm: Tensor
    box: tuple[int, int, int, int]
    lam: float


def sample_cutmix(n: int, height: int, width: int, *, alpha: float = 1.0, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> CutMix:
    """A CutMix draw (Yun et al. 2019): ``lam ~ Beta(alpha, alpha)``, a box of side
    ``sqrt(1 - lam)`` of the image's around a uniform centre, clipped to the image."""
    if not alpha > 0:
        raise ValueError(f"cutmix alpha must be > 0, got {alpha!r}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    import numpy as np

    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    cut = math.sqrt(1.0 - lam)
    cw, ch = int(width * cut), int(height * cut)
    c = torch.randint(0, 2**31 - 1, (2,), generator=generator, device=generator.device).tolist()
    cx, cy = c[0] % width, c[1] % height
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    lam = 1.0 - (x1 - x0) * (y1 - y0) / float(width * height)
    return CutMix(perm, (x0, y0, x1, y1), lam)


def cutmix(x: Tensor, cm: CutMix) -> Tensor:
    """``x`` with ``cm.box`` of every image replaced by the same box of its partner (differentiable)."""
    x0, y0, x1, y1 = cm.box
    if x1 <= x0 or y1 <= y0:
        return x
    mask = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
    mask[y0:y1, x0:x1] = True
    return torch.where(mask, x[cm.perm.to(x.device)], x)


def random_shift(x: Tensor, max_shift: int, *, generator: torch.Generator) -> Tensor:
    """SRe2L's jitter: the whole batch rolled by one random ``(dy, dx)`` in ``[-max_shift, max_shift]``."""
    if max_shift <= 0:
        return x
    d = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator, device=generator.device).tolist()
    return torch.roll(x, shifts=(int(d[0]), int(d[1])), dims=(-2, -1))
