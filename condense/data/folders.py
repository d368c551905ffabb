"""Image-file datasets: Tiny-ImageNet (tiny-imagenet-200 layout) and a generic ImageFolder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from condense.data._common import (
    DATASETS,
    ENV_ROOT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetBuilder,
    DatasetFormatError,
    DatasetInfo,
    RawSplits,
    first_match,
    locate,
)
from condense.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_DEFAULT_FOLDER_SIZE = 64


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension, case-insensitive), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _decode_one(path: Path, size: int) -> np.ndarray:
    """One image file -> ``(3, size, size)`` uint8 RGB (antialiased resize when needed)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                # PIL widens the filter support when shrinking, i.e. this is antialiased
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot decode image ({exc})") from exc
    return arr.transpose(2, 0, 1)


def decode_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """Decode image files into one ``(N, 3, size, size)`` uint8 array (threaded decoding)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_one(paths[i], size)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(len(paths))))
    return out


def _check_size(im_size: int | None, default: int) -> int:
    size = default if im_size is None else im_size
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"im_size must be a positive int, got {im_size!r}")
    return size


# ----------------------------------------------------------------------------- Tiny-ImageNet

_TINY_HOW_TO = (
    "download tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) and unzip "
    "it under dataset.root"
)
_TINY_LAYOUTS = "tiny-imagenet-200/ (wnids.txt, train/, val/) or those entries directly"


def _is_tiny(folder: Path) -> bool:
    return (folder / "wnids.txt").is_file() and (folder / "train").is_dir()


def _find_tiny(base: Path) -> Path | None:
    return first_match(base, ("tiny-imagenet-200", ""), _is_tiny)


def _locate_tiny(root: Path | None) -> Path:
    return locate(
        "tiny_imagenet", root, _find_tiny, files=["wnids.txt", "train/"], layouts=_TINY_LAYOUTS,
        how_to_get=_TINY_HOW_TO,
    )


def _tiny_wnids(folder: Path) -> list[str]:
    wnids = sorted({ln.strip() for ln in (folder / "wnids.txt").read_text().splitlines() if ln.strip()})
    if not wnids:
        raise DatasetFormatError(f"{folder / 'wnids.txt'}: no class ids")
    return wnids


def _tiny_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """``words.txt`` descriptions where present, else the wnids themselves."""
    words: dict[str, str] = {}
    words_file = folder / "words.txt"
    if words_file.is_file():
        wanted = set(wnids)
        for line in words_file.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted and text.strip():
                words[wnid] = text.strip()
    return tuple(words.get(w, w) for w in wnids)


def _tiny_read_names(root: Path | None) -> tuple[str, ...]:
    folder = _locate_tiny(root)
    return _tiny_names(folder, _tiny_wnids(folder))


def _tiny_val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """val/val_annotations.txt + val/images/, or (re-organized copies) val/<wnid>/[images/]."""
    index = {w: i for i, w in enumerate(wnids)}
    val = folder / "val"
    ann = val / "val_annotations.txt"
    paths: list[Path] = []
    labels: list[int] = []
    if ann.is_file():
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DatasetFormatError(f"{ann}:{n}: class {parts[1]!r} is not in wnids.txt")
            paths.append(val / "images" / parts[0])
            labels.append(index[parts[1]])
        return paths, labels
    if not val.is_dir():
        raise DatasetNotFoundError(f"{val}: Tiny-ImageNet validation split missing; {_TINY_HOW_TO}")
    return _class_dirs(val, wnids)


def _class_dirs(split: Path, classes: list[str], *, require: bool = False) -> tuple[list[Path], list[int]]:
    """Image files of ``split/<class>/`` (or ``split/<class>/images/``) with their labels.

    Raises:
        DatasetFormatError: ``require`` and a class folder is missing.
    """
    paths: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        cdir = split / name
        img_dir = cdir / "images" if (cdir / "images").is_dir() else cdir
        if not img_dir.is_dir():
            if require:
                raise DatasetFormatError(f"{cdir}: missing folder of class {name!r}")
            continue
        files = list_images(img_dir)
        paths += files
        labels += [c] * len(files)
    return paths, labels


def _load_tiny(root: Path | None, allow_download: bool | None, im_size: int | None) -> RawSplits:
    del allow_download  # no automatic download exists
    size = _check_size(im_size, 64)
    folder = _locate_tiny(root)
    wnids = _tiny_wnids(folder)
    train_paths, train_y = _class_dirs(folder / "train", wnids, require=True)
    test_paths, test_y = _tiny_val_files(folder, wnids)
    log.info("tiny_imagenet: decoding %d + %d images", len(train_paths), len(test_paths))
    return RawSplits(
        decode_images(train_paths, size),
        np.asarray(train_y, dtype=np.int64),
        decode_images(test_paths, size),
        np.asarray(test_y, dtype=np.int64),
        _tiny_names(folder, wnids),
        folder,
    )


# ----------------------------------------------------------------------------- ImageFolder


def _folder_root(root: Path | None) -> Path:
    """``root`` or ``$CONDENSE_DATA_ROOT``; must hold ``train/`` and ``val/`` or ``test/``."""
    if root is None:
        env = os.environ.get(ENV_ROOT)
        if not env:
            raise DatasetNotFoundError(
                "dataset 'imagefolder' needs a folder: set dataset.root=PATH (or "
                f"{ENV_ROOT}=PATH) to a folder holding train/<class>/* and val/<class>/* "
                "(or test/<class>/*)"
            )
        root = Path(env)
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise DatasetNotFoundError(
            f"dataset 'imagefolder': {root / 'train'} is missing; expected {root}/train/<class>/* "
            "and val/<class>/* (or test/<class>/*); set dataset.root=PATH to such a folder"
        )
    return root


def _test_split(root: Path) -> Path:
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise DatasetNotFoundError(
        f"dataset 'imagefolder': {root} has train/ but neither val/ nor test/; add one with the "
        "same class folders"
    )


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_classes(root: Path) -> list[str]:
    train_classes = _subdirs(root / "train")
    if not train_classes:
        raise DatasetFormatError(f"{root / 'train'}: no class folders")
    test_dir = _test_split(root)
    test_classes = _subdirs(test_dir)
    if test_classes != train_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DatasetFormatError(
            f"dataset 'imagefolder': class folders differ between {root / 'train'} and {test_dir}: "
            f"only in train {only_train}, only in {test_dir.name} {only_test}"
        )
    return train_classes


def _folder_read_names(root: Path | None) -> tuple[str, ...]:
    return tuple(_folder_classes(_folder_root(root)))


def _load_folder(root: Path | None, allow_download: bool | None, im_size: int | None) -> RawSplits:
    del allow_download
    size = _check_size(im_size, _DEFAULT_FOLDER_SIZE)
    folder = _folder_root(root)
    classes = _folder_classes(folder)
    train_paths, train_y = _class_dirs(folder / "train", classes)
    present = set(train_y)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise DatasetFormatError(f"{folder / 'train'}: class folders without images: {empty}")
    test_paths, test_y = _class_dirs(_test_split(folder), classes)
    log.info("imagefolder: decoding %d + %d images from %s", len(train_paths), len(test_paths), folder)
    return RawSplits(
        decode_images(train_paths, size),
        np.asarray(train_y, dtype=np.int64),
        decode_images(test_paths, size),
        np.asarray(test_y, dtype=np.int64),
        tuple(classes),
        folder,
    )


DATASETS.add(
    "tiny_imagenet",
    DatasetBuilder(DatasetInfo(3, 64, IMAGENET_MEAN, IMAGENET_STD, None), _load_tiny, _tiny_read_names),
)
DATASETS.add(
    "imagefolder",
    DatasetBuilder(
        DatasetInfo(3, _DEFAULT_FOLDER_SIZE, IMAGENET_MEAN, IMAGENET_STD, None),
        _load_folder,
        _folder_read_names,
    ),
)
