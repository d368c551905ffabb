"""ZCA whitening of image sets (as used by the MTT family on CIFAR).

The whitening matrix is ``U diag(1/sqrt(S + reg)) U^T`` where ``U, S`` are the eigenvectors and
eigenvalues of the unbiased (``N-1``) covariance of the flattened, per-feature-centred images;
``reg`` is added to every eigenvalue (the role of ``eps`` in kornia's ``ZCAWhitening``; the
MTT reference uses 0.1). Whitening is ``(x - mean) @ W``; its inverse ``x @ W^-1 + mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condense.errors import ConfigError

#: rows per chunk when accumulating the covariance (bounds float64 temporaries)
_CHUNK = 4096


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the eigendecomposition wherever the backend has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _flat(images: torch.Tensor) -> torch.Tensor:
    if images.dim() < 2:
        raise ConfigError(f"ZCA needs images shaped (N, ...), got shape {tuple(images.shape)}")
    return images.reshape(images.shape[0], -1)


@dataclass
class ZCA:
    """A fitted ZCA transform.

    Attributes:
        mean: ``(D,)`` per-feature mean of the fitting images.
        matrix: ``(D, D)`` symmetric whitening matrix.
        inverse: ``(D, D)`` its inverse (colouring matrix).
        reg: the eigenvalue regularizer used.
    """

    mean: torch.Tensor
    matrix: torch.Tensor
    inverse: torch.Tensor
    reg: float

    @classmethod
    def fit(cls, images: torch.Tensor, reg: float = 0.1) -> ZCA:
        """Fit on ``(N, C, H, W)`` (or any ``(N, ...)``) images; D = C*H*W.

        Raises:
            ConfigError: ``reg < 0``, fewer than 2 images, or a singular covariance with
                ``reg == 0``.
        """
        if reg < 0:
            raise ConfigError(f"ZCA reg must be >= 0, got {reg}")
        x = _flat(images)
        n, d = x.shape
        if n < 2:
            raise ConfigError(f"ZCA needs at least 2 images to estimate a covariance, got {n}")
        wd = _work_dtype(x.device)
        mean = x.sum(0, dtype=wd) / n
        cov = torch.zeros(d, d, dtype=wd, device=x.device)
        for start in range(0, n, _CHUNK):
            xc = x[start : start + _CHUNK].to(wd) - mean
            cov.addmm_(xc.T, xc)
        cov /= n - 1
        evals, evecs = torch.linalg.eigh(cov)
        shifted = evals.clamp_min(0) + reg
        tol = torch.finfo(wd).eps * d * float(evals.max().clamp_min(0))
        if float(shifted.min()) <= tol:
            raise ConfigError(
                f"ZCA covariance is singular (smallest eigenvalue {float(evals.min()):.3g}) "
                "with reg=0; use reg > 0"
            )
        matrix = (evecs * shifted.rsqrt()) @ evecs.T
        inverse = (evecs * shifted.sqrt()) @ evecs.T
        dt = images.dtype if images.is_floating_point() else torch.float32
        return cls(mean.to(dt), matrix.to(dt), inverse.to(dt), float(reg))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten ``(N, C, H, W)`` images -> same shape."""
        return apply_zca(images, self.matrix, self.mean)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply`: whitened ``(N, C, H, W)`` -> original space."""
        x = _flat(images)
        out = x @ self.inverse.to(x) + self.mean.to(x)
        return out.reshape(images.shape)

    def to(self, device: torch.device | str) -> ZCA:
        return ZCA(self.mean.to(device), self.matrix.to(device), self.inverse.to(device), self.reg)


def fit_zca(images: torch.Tensor, reg: float = 0.1) -> torch.Tensor:
    """Whitening matrix of ``(N, C, H, W)`` images.

    Args:
        images: ``(N, C, H, W)`` (any ``(N, ...)``); D = C*H*W.
        reg: added to every covariance eigenvalue before the inverse square root.

    Returns:
        ``(D, D)`` symmetric matrix ``W``; whitening is ``(x - mean) @ W`` (see :class:`ZCA`
        for the mean and the inverse).
    """
    return ZCA.fit(images, reg).matrix


def apply_zca(images: torch.Tensor, matrix: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Whiten images with a fitted matrix.

    Args:
        images: ``(N, C, H, W)``; ``C*H*W`` must equal D.
        matrix: ``(D, D)`` from :func:`fit_zca`.
        mean: optional ``(D,)`` feature mean subtracted first (``ZCA.mean``); without it the
            images are assumed centred (true up to small error in normalized space).

    Returns:
        ``(N, C, H, W)`` whitened images, dtype and device of ``images``.
    """
    x = _flat(images)
    if matrix.shape != (x.shape[1], x.shape[1]):
        raise ConfigError(f"ZCA matrix shape {tuple(matrix.shape)} does not match image size D={x.shape[1]}")
    if mean is not None:
        x = x - mean.to(x)
    return (x @ matrix.to(x)).reshape(images.shape)
