"""ZCA whitening: identity covariance, kornia reference, inverse round trip."""

from __future__ import annotations

import pytest
import torch

from condense.data import ZCA, apply_zca, fit_zca
from condense.errors import ConfigError


def correlated_images(n: int = 600, seed: int = 0) -> torch.Tensor:
    """``(n, 3, 2, 2)`` images with correlated, non-centred, well-conditioned features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g) + 3 * torch.eye(12)
    x = torch.randn(n, 12, generator=g) @ mix + torch.linspace(-1, 1, 12)
    return x.view(n, 3, 2, 2)


def test_whitened_covariance_is_identity() -> None:
    images = correlated_images()
    zca = ZCA.fit(images, reg=0.0)
    white = zca.apply(images).flatten(1)
    assert white.shape == (600, 12)
    torch.testing.assert_close(white.mean(0), torch.zeros(12), atol=1e-4, rtol=0)
    cov = white.T @ white / (len(white) - 1)
    torch.testing.assert_close(cov, torch.eye(12), atol=1e-3, rtol=0)
    matrix = fit_zca(images, reg=0.0)
    assert matrix.shape == (12, 12) and torch.allclose(matrix, matrix.T, atol=1e-5)


def test_matches_kornia_reference_and_inverts() -> None:
    kornia = pytest.importorskip("kornia")
    images = correlated_images(seed=1)
    ref = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(images.double())
    zca = ZCA.fit(images, reg=0.1)
    torch.testing.assert_close(zca.matrix.double(), ref.transform_matrix, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zca.apply(images).double(), ref(images.double()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zca.invert(zca.apply(images)), images, atol=1e-4, rtol=1e-4)
    centred = images - images.mean(0, keepdim=True)
    torch.testing.assert_close(apply_zca(centred, zca.matrix), zca.apply(images), atol=1e-4, rtol=1e-4)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="singular"):
        ZCA.fit(torch.randn(5, 3, 2, 2), reg=0.0)  # N < D
    with pytest.raises(ConfigError, match="reg"):
        fit_zca(torch.randn(5, 4), reg=-1.0)
    with pytest.raises(ConfigError, match="does not match"):
        apply_zca(torch.randn(2, 3, 2, 2), torch.eye(5))
