"""Per-class random sampling of real images, batched over classes, on any device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from condense.errors import ConfigError


class ClassIndex:
    """Row indices of every class, laid out for batched sampling without replacement.

    Internally a ``(K, max_count)`` table holds each class's row indices (padded); sampling draws
    one random key per table cell, pushes padding keys past every real key and keeps the ``n``
    smallest keys per row, so every class gets ``n`` distinct rows from one sort.

    Args:
        labels: ``(N,)`` integer labels in ``[0, num_classes)``, on the device to sample on.
        num_classes: K.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        if labels.dim() != 1:
            raise ConfigError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
        if num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ConfigError(
                f"labels span [{int(labels.min())}, {int(labels.max())}], expected [0, {num_classes - 1}]"
            )
        self.num_classes = num_classes
        self.device = labels.device
        self.counts = torch.bincount(labels, minlength=num_classes)  # (K,)
        self._counts_host: list[int] = self.counts.tolist()
        order = torch.argsort(labels, stable=True)  # rows grouped by class, ascending
        starts = torch.cumsum(self.counts, 0) - self.counts  # (K,)
        width = max(max(self._counts_host), 1)
        col = torch.arange(width, device=self.device)
        self._valid = col.unsqueeze(0) < self.counts.unsqueeze(1)  # (K, width)
        pos = (starts.unsqueeze(1) + col.unsqueeze(0)).clamp_max(max(labels.numel() - 1, 0))
        table = order[pos] if labels.numel() else torch.zeros_like(pos)
        self._table = torch.where(self._valid, table, torch.full_like(table, -1))  # (K, width)

    @property
    def min_count(self) -> int:
        """Size of the smallest class."""
        return min(self._counts_host)

    def indices_of(self, c: int) -> torch.Tensor:
        """``(count_c,)`` row indices of class ``c`` (ascending)."""
        self._check_class(c)
        return self._table[c, : self._counts_host[c]].clone()

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        classes: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` distinct rows of each requested class.

        Args:
            n: rows per class.
            generator: a ``torch.Generator`` on the labels' device.
            classes: class ids (default: all K, in order).

        Returns:
            ``(len(classes), n)`` int64 row indices into the dataset, on the labels' device.

        Raises:
            ConfigError: ``n`` exceeds a requested class's size, a bad class id, or a generator
                on another device.
        """
        cls_list = self._class_list(classes)
        if n < 0:
            raise ConfigError(f"n must be >= 0, got {n}")
        for c in cls_list:
            if n > self._counts_host[c]:
                raise ConfigError(
                    f"cannot draw n={n} distinct images from class {c}: it has only {self._counts_host[c]}"
                )
        if generator.device.type != self.device.type:
            raise ConfigError(
                f"generator is on {generator.device}, labels are on {self.device}; "
                "create the generator on the labels' device"
            )
        rows = torch.as_tensor(cls_list, dtype=torch.long, device=self.device)
        keys = torch.rand((len(cls_list), self._table.shape[1]), generator=generator, device=self.device)
        keys = keys.masked_fill(~self._valid[rows], 2.0)  # padding sorts last
        pick = torch.argsort(keys, dim=1)[:, :n]  # (k, n)
        return self._table[rows].gather(1, pick)

    def gather(
        self,
        images: torch.Tensor,
        n: int,
        generator: torch.Generator,
        classes: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` random images of each requested class.

        Args:
            images: ``(N, C, H, W)`` rows aligned with the labels.
            n, generator, classes: as in :meth:`sample`.

        Returns:
            ``(len(classes), n, C, H, W)`` on ``images``' device.
        """
        idx = self.sample(n, generator, classes)
        k = idx.shape[0]
        return images[idx.reshape(-1).to(images.device)].reshape(k, n, *images.shape[1:])

    # ------------------------------------------------------------------ helpers

    def _check_class(self, c: int) -> None:
        if not 0 <= int(c) < self.num_classes:
            raise ConfigError(f"class {c} out of range; valid: 0..{self.num_classes - 1}")

    def _class_list(self, classes: Sequence[int] | torch.Tensor | None) -> list[int]:
        if classes is None:
            return list(range(self.num_classes))
        out = classes.tolist() if isinstance(classes, torch.Tensor) else [int(c) for c in classes]
        for c in out:
            self._check_class(c)
        return out

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return (
            f"ClassIndex(num_classes={self.num_classes}, n={sum(self._counts_host)}, "
            f"min_count={self.min_count}, device={self.device})"
        )
