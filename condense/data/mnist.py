"""MNIST and Fashion-MNIST from IDX files (``.gz`` or uncompressed), parsed with numpy."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
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

#: Distribution-package folders (Debian ``dataset-fashion-mnist``); tests patch this mapping.
SYSTEM_DIRS: dict[str, Path] = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: IDX type byte -> numpy big-endian dtype
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class _IdxSource:
    """Where one IDX dataset may live and how to fetch it."""

    name: str
    subdir: str  # e.g. "fashion-mnist"
    torchvision_class: str  # e.g. "FashionMNIST"
    how_to_get: str


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when its name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        The array with the shape stored in the header (e.g. ``(N, 28, 28)`` uint8 images).

    Raises:
        DatasetFormatError: bad magic number, unknown type code or wrong payload size.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'}, expected 0000<type><ndim>)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: unknown IDX type code 0x{code:02x}; valid: "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX payload is {len(raw) - header} bytes, header {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _has_idx_files(folder: Path) -> bool:
    return all(_idx_path(folder, stem) is not None for stem in IDX_FILES)


def _read_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _idx_path(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_path(folder, f"{prefix}-labels-idx1-ubyte")
    assert images_path is not None and labels_path is not None  # checked by _has_idx_files
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetFormatError(
            f"{labels_path}: expected {len(images)} labels (N,), got shape {labels.shape}"
        )
    return images[:, None], labels  # (N, 1, H, W)


def _make_loader(src: _IdxSource):
    layouts = f"the 4 IDX files (.gz or not) in the folder itself, in {src.subdir}/, or in {src.torchvision_class}/raw/"

    def find(base: Path) -> Path | None:
        return first_match(base, ("", src.subdir, f"{src.torchvision_class}/raw"), _has_idx_files)

    def download(target: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, src.torchvision_class)
        for train in (True, False):
            cls(root=str(target), train=train, download=True)

    def load(root: Path | None, allow_download: bool | None, im_size: int | None) -> RawSplits:
        del im_size  # resizing happens in build_dataset
        folder = locate(
            src.name,
            root,
            find,
            files=[f"{stem}[.gz]" for stem in IDX_FILES],
            layouts=layouts,
            how_to_get=src.how_to_get,
            system_dir=SYSTEM_DIRS.get(src.name),
            download=download,
            allow_download=allow_download,
        )
        train_x, train_y = _read_split(folder, "train")
        test_x, test_y = _read_split(folder, "t10k")
        names = DATASETS.get(src.name).info.class_names or ()
        return RawSplits(
            train_x,
            check_labels(train_y, len(names), str(folder / "train labels")),
            test_x,
            check_labels(test_y, len(names), str(folder / "t10k labels")),
            names,
            folder,
        )

    return load


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DATASETS.add(
    "fashion_mnist",
    DatasetBuilder(
        DatasetInfo(1, 28, (0.2861,), (0.3530,), FASHION_MNIST_CLASSES),
        _make_loader(
            _IdxSource(
                "fashion_mnist",
                "fashion-mnist",
                "FashionMNIST",
                "`apt-get install dataset-fashion-mnist` (Debian package, offline-friendly), "
                "`bash scripts/get_data.sh`, or allow downloads (unset CONDENSE_OFFLINE) so "
                "torchvision fetches it",
            )
        ),
    ),
)

DATASETS.add(
    "mnist",
    DatasetBuilder(
        DatasetInfo(1, 28, (0.1307,), (0.3081,), tuple(str(d) for d in range(10))),
        _make_loader(
            _IdxSource(
                "mnist",
                "mnist",
                "MNIST",
                "allow downloads (unset CONDENSE_OFFLINE) so torchvision fetches it, or copy "
                "the 4 IDX files of MNIST into a folder",
            )
        ),
    ),
)
