"""Datasets as normalized tensors, per-class sampling, ZCA whitening.

Entry points: :func:`build_dataset` (name -> :class:`~condense.types.RealData`),
:func:`get_spec` (name -> :class:`~condense.types.DatasetSpec`, without loading images),
:data:`DATASETS` (the registry), :class:`ClassIndex`, :func:`fit_zca` / :func:`apply_zca`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

# importing the modules registers their datasets
from condense.data import cifar as _cifar  # noqa: F401
from condense.data import folders as _folders  # noqa: F401
from condense.data import mnist as _mnist  # noqa: F401
from condense.data import svhn as _svhn  # noqa: F401
from condense.data._common import (
    DATASETS,
    DatasetBuilder,
    DatasetFormatError,
    DatasetInfo,
    RawSplits,
    to_normalized,
)
from condense.data.class_index import ClassIndex
from condense.data.zca import ZCA, apply_zca, fit_zca
from condense.errors import ConfigError
from condense.types import DatasetSpec, RealData

__all__ = [
    "describe_root",
    "DATASETS",
    "ZCA",
    "ClassIndex",
    "DatasetBuilder",
    "DatasetFormatError",
    "DatasetInfo",
    "RawSplits",
    "apply_zca",
    "build_dataset",
    "fit_zca",
    "get_spec",
]

log = logging.getLogger(__name__)


def _target_size(info: DatasetInfo, im_size: int | None) -> int:
    if im_size is None:
        return info.im_size
    if not isinstance(im_size, int) or isinstance(im_size, bool) or im_size <= 0:
        raise ConfigError(f"im_size must be a positive int or None, got {im_size!r}")
    return im_size


def _make_spec(name: str, info: DatasetInfo, size: int, names: tuple[str, ...]) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        channels=info.channels,
        im_size=(size, size),
        num_classes=len(names),
        class_names=names,
        mean=info.mean,
        std=info.std,
    )


def get_spec(name: str, root: str | Path | None = None, *, im_size: int | None = None) -> DatasetSpec:
    """A dataset's description without loading its images.

    Fixed datasets (MNIST, Fashion-MNIST, CIFAR, SVHN) need no files; ``tiny_imagenet`` and
    ``imagefolder`` read their class list from disk (cheap: no image is decoded).

    Args:
        name: registry key, e.g. ``"fashion_mnist"``.
        root: dataset folder (see :func:`build_dataset`).
        im_size: square side the images will be resized to (default: native size).

    Raises:
        UnknownNameError: unknown name (lists the valid choices).
        DatasetNotFoundError: class names must be read from files that are not found.
    """
    builder = DATASETS.get(name)
    size = _target_size(builder.info, im_size)
    root_path = Path(root).expanduser() if root is not None else None
    return _make_spec(name, builder.info, size, builder.class_names(root_path))


def build_dataset(
    name: str,
    root: str | Path | None = None,
    device: torch.device | str = "cpu",
    *,
    allow_download: bool | None = None,
    im_size: int | None = None,
) -> RealData:
    """Load a dataset as normalized tensors on ``device``.

    With ``root`` the files are searched there only: a root without them is an error (or, where
    torchvision can fetch the dataset and downloads are allowed, they are downloaded into it),
    never a silent switch to another copy. Without ``root``: ``$CONDENSE_DATA_ROOT``, then the
    distribution package folder (Fashion-MNIST: ``/usr/share/datasets/fashion-mnist``), then
    the download cache, then a torchvision download into the cache when allowed.

    Args:
        name: registry key: ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``svhn``,
            ``tiny_imagenet``, ``imagefolder``.
        root: a folder holding the files (layouts per dataset are listed in the not-found error).
        device: where the tensors live.
        allow_download: ``None`` = allowed unless ``CONDENSE_OFFLINE=1``.
        im_size: square side to resize to (antialiased); default the native size (64 for
            ``imagefolder``).

    Returns:
        :class:`RealData` with float32 ``(N, C, S, S)`` images normalized as
        ``(x/255 - mean)/std``, int64 ``(N,)`` labels and ``root`` the absolute folder the files
        were read from.

    Raises:
        UnknownNameError: unknown name. DatasetNotFoundError: files not in ``root`` (when given)
            or not at any searched place (names the places and the files looked for).
        DatasetFormatError: a file is corrupt.
    """
    builder = DATASETS.get(name)
    size = _target_size(builder.info, im_size)
    dev = torch.device(device)
    root_path = Path(root).expanduser() if root is not None else None
    raw = builder(root_path, allow_download, im_size)
    spec = _make_spec(name, builder.info, size, tuple(raw.class_names))
    data = RealData(
        spec=spec,
        train_images=to_normalized(raw.train_x, spec.mean, spec.std, dev, size),
        train_labels=torch.from_numpy(raw.train_y.astype("int64", copy=False)).to(dev),
        test_images=to_normalized(raw.test_x, spec.mean, spec.std, dev, size),
        test_labels=torch.from_numpy(raw.test_y.astype("int64", copy=False)).to(dev),
        root=str(Path(raw.source).absolute()),
    )
    log.info(
        "dataset %s from %s: train %s, test %s, %d classes, on %s",
        name,
        raw.source,
        tuple(data.train_images.shape),
        tuple(data.test_images.shape),
        spec.num_classes,
        dev,
    )
    return data


#: How a record names a distribution package's data folder (the same package on every machine,
#: wherever the distribution puts it): ``<system>/<folder name>``.
SYSTEM_LABEL = "<system>"


def describe_root(root: str | Path) -> str:
    """How a run record names the folder its data came from, portably: a distribution package's
    folder as ``<system>/<name>`` (e.g. ``<system>/fashion-mnist``), any other folder as
    :func:`condense.provenance.portable_path` writes it (relative to the working directory,
    ``~/...`` under the home directory, else absolute)."""
    from condense.data.mnist import SYSTEM_DIRS
    from condense.provenance import portable_path

    path = Path(root).absolute()
    if path in {p.absolute() for p in SYSTEM_DIRS.values()}:
        return f"{SYSTEM_LABEL}/{path.name}"
    return portable_path(path)
