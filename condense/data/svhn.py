"""SVHN (cropped digits) from ``train_32x32.mat`` / ``test_32x32.mat``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from condense.data._common import (
    DATASETS,
    DatasetBuilder,
    DatasetFormatError,
    DatasetInfo,
    RawSplits,
    check_labels,
    first_match,
    locate,
)

_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``.mat`` file.

    Returns:
        ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels with digit 0 as 0 (the file
        stores it as 10).

    Raises:
        DatasetFormatError: unreadable file or unexpected variables/shapes.
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read MATLAB file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: expected variables 'X' and 'y', found {sorted(mat)}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise DatasetFormatError(f"{path}: X has shape {x.shape}, expected (H, W, 3, {len(y)})")
    x = np.ascontiguousarray(x.astype(np.uint8, copy=False).transpose(3, 2, 0, 1))
    return x, np.where(y == 10, 0, y)


def _is_svhn(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _FILES.values())


def _find(base: Path) -> Path | None:
    return first_match(base, ("", "svhn", "SVHN"), _is_svhn)


def _download(target: Path) -> None:
    import torchvision.datasets as tvd

    for split in _FILES:
        tvd.SVHN(root=str(target), split=split, download=True)


def _load(root: Path | None, allow_download: bool | None, im_size: int | None) -> RawSplits:
    del im_size
    folder = locate(
        "svhn",
        root,
        _find,
        files=list(_FILES.values()),
        layouts="train_32x32.mat and test_32x32.mat in the folder itself or in svhn/",
        how_to_get="allow downloads (unset CONDENSE_OFFLINE) so torchvision fetches it, or "
        "copy train_32x32.mat and test_32x32.mat under dataset.root",
        download=_download,
        allow_download=allow_download,
    )
    train_x, train_y = read_svhn_mat(folder / _FILES["train"])
    test_x, test_y = read_svhn_mat(folder / _FILES["test"])
    names = SVHN_CLASSES
    return RawSplits(
        train_x,
        check_labels(train_y, 10, str(folder / _FILES["train"])),
        test_x,
        check_labels(test_y, 10, str(folder / _FILES["test"])),
        names,
        folder,
    )


SVHN_CLASSES = tuple(str(d) for d in range(10))

DATASETS.add(
    "svhn",
    DatasetBuilder(
        DatasetInfo(3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), SVHN_CLASSES),
        _load,
    ),
)
