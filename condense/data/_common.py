"""Shared plumbing of the dataset builders: the registry, file search, tensor conversion."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from condense.errors import CondenseError, DatasetNotFoundError
from condense.registry import Registry

log = logging.getLogger(__name__)

ENV_ROOT = "CONDENSE_DATA_ROOT"
ENV_OFFLINE = "CONDENSE_OFFLINE"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: rows converted to float per chunk (bounds the transient memory of the conversion)
_CHUNK = 8192


class DatasetFormatError(CondenseError, ValueError):
    """A dataset file exists but is corrupt, truncated or not in the expected format."""


@dataclass(frozen=True)
class DatasetInfo:
    """The fixed facts of a dataset (everything but the files).

    Attributes:
        channels: 1 (grayscale) or 3 (RGB).
        im_size: native (or default) square side in pixels.
        mean: per-channel mean of ``x`` in [0, 1].
        std: per-channel std.
        class_names: fixed class names, or ``None`` when they are read from the files.
    """

    channels: int
    im_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None


@dataclass
class RawSplits:
    """Decoded dataset before normalization.

    Attributes:
        train_x: ``(N, C, H, W)`` uint8.
        train_y: ``(N,)`` integer labels.
        test_x: ``(M, C, H, W)`` uint8.
        test_y: ``(M,)`` integer labels.
        class_names: one name per class, index = label.
        source: the directory the files came from.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    source: Path


#: ``load(root, allow_download, im_size) -> RawSplits``
LoadFn = Callable[[Path | None, bool | None, int | None], RawSplits]
#: ``names(root) -> class names`` (for datasets whose names live in the files)
NamesFn = Callable[[Path | None], tuple[str, ...]]


@dataclass(frozen=True)
class DatasetBuilder:
    """A registered dataset: its fixed facts, a loader and (if needed) a class-name reader.

    Calling the builder loads the raw splits.
    """

    info: DatasetInfo
    load: LoadFn
    read_names: NamesFn | None = None

    def __call__(
        self, root: Path | None, allow_download: bool | None = None, im_size: int | None = None
    ) -> RawSplits:
        return self.load(root, allow_download, im_size)

    def class_names(self, root: Path | None) -> tuple[str, ...]:
        """Class names: fixed ones, or read (cheaply) from the files under ``root``."""
        if self.info.class_names is not None:
            return self.info.class_names
        if self.read_names is None:  # pragma: no cover - registration error
            raise CondenseError("dataset builder has neither fixed class names nor a reader")
        return self.read_names(root)


DATASETS: Registry[DatasetBuilder] = Registry("dataset")


# ----------------------------------------------------------------------------- search


def allow_download_default(allow_download: bool | None) -> bool:
    """``None`` -> True unless the environment sets ``CONDENSE_OFFLINE=1``."""
    if allow_download is not None:
        return bool(allow_download)
    return os.environ.get(ENV_OFFLINE, "").strip().lower() not in ("1", "true", "yes")


def cache_dir() -> Path:
    """Where downloads go when no root is given: ``$XDG_CACHE_HOME/condense/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "condense" / "data"


def search_bases(root: str | Path | None, system_dir: Path | None) -> list[tuple[str, Path]]:
    """The base folders searched, in order, each with a label for error messages.

    An explicit ``root`` is the only place searched: a folder without the files is an error,
    never a silent switch to another copy. Without one: ``$CONDENSE_DATA_ROOT``, the
    distribution package folder, the download cache.
    """
    if root is not None:
        return [("dataset.root", Path(root).expanduser())]
    bases: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_ROOT)
    if env:
        bases.append((f"${ENV_ROOT}", Path(env).expanduser()))
    if system_dir is not None:
        bases.append(("system package", system_dir))
    bases.append(("download cache", cache_dir()))
    return bases


def first_match(base: Path, subdirs: Sequence[str], ok: Callable[[Path], bool]) -> Path | None:
    """The first of ``base/sub`` (``""`` = base itself) that is a folder accepted by ``ok``."""
    for sub in subdirs:
        cand = base / sub if sub else base
        if cand.is_dir() and ok(cand):
            return cand
    return None


def locate(
    name: str,
    root: str | Path | None,
    find: Callable[[Path], Path | None],
    *,
    files: Sequence[str],
    layouts: str,
    how_to_get: str,
    system_dir: Path | None = None,
    download: Callable[[Path], None] | None = None,
    allow_download: bool | None = None,
) -> Path:
    """Find a dataset's folder, downloading it as a last resort.

    With ``root`` only ``root`` is searched (then, if allowed, the files are downloaded into
    it); without one the chain of :func:`search_bases` is searched and downloads go to the
    cache.

    Args:
        name: registry name (for messages).
        root: user root or ``None``.
        find: maps a base folder to the folder holding the files, or ``None``.
        files: the names of the files (or folders) looked for, for the not-found error.
        layouts: human description of the accepted layouts under a base folder.
        how_to_get: human instructions appended to the not-found error.
        system_dir: a distribution package's install folder, if any.
        download: fetches the files into the given folder (e.g. torchvision), if possible.
        allow_download: see :func:`allow_download_default`.

    Returns:
        The folder holding the dataset files.

    Raises:
        DatasetNotFoundError: nothing found and no successful download; the message names the
            places searched, the files looked for and how to get the data.
    """
    bases = search_bases(root, system_dir)
    for label, base in bases:
        found = find(base)
        if found is not None:
            log.info("dataset %s: using files in %s (%s)", name, found, label)
            return found
    status = "no automatic download exists for it"
    if download is not None:
        if allow_download_default(allow_download):
            target = Path(root).expanduser() if root is not None else cache_dir()
            log.info("dataset %s: not found locally, downloading into %s", name, target)
            try:
                target.mkdir(parents=True, exist_ok=True)
                download(target)
            except Exception as exc:  # network, permissions, checksum: all reported below
                status = f"download into {target} failed: {type(exc).__name__}: {exc}"
            else:
                found = find(target)
                if found is not None:
                    return found
                status = f"download into {target} finished but the files are not there"
        else:
            status = f"download disabled (allow_download=False or {ENV_OFFLINE}=1)"
    wanted = ", ".join(files)
    status = f"{status[0].upper()}{status[1:]}"
    if root is not None:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found in dataset.root={bases[0][1]}: looked for {wanted} "
            f"({layouts}). {status}. An explicit root is the only place searched: fix the path, "
            f"or leave dataset.root unset to search {ENV_ROOT}, the system package and the download "
            f"cache. To get it: {how_to_get}."
        )
    searched = "; ".join(f"{label}: {base}" for label, base in bases)
    searched += f" (no dataset.root given, {ENV_ROOT} {'set' if os.environ.get(ENV_ROOT) else 'unset'})"
    raise DatasetNotFoundError(
        f"dataset {name!r} not found. Searched {searched} for {wanted}; accepted layouts under "
        f"each: {layouts}. {status}. To get it: {how_to_get}; or set dataset.root=PATH "
        f"(or {ENV_ROOT}=PATH) to a folder holding the files."
    )


# ----------------------------------------------------------------------------- tensors


def check_labels(y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Validate ``(N,)`` integer labels in ``[0, num_classes)``; returns them as int64."""
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetFormatError(
            f"{what}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]"
        )
    return y


def to_normalized(
    x: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    im_size: int | None = None,
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(N, C, S, S)`` normalized ``(x/255 - mean)/std``.

    Converts in chunks on ``device`` (no per-sample loop); resizes with antialiased bilinear
    interpolation when ``im_size`` differs from the stored size.
    """
    n, c, h, w = x.shape
    out_h, out_w = (h, w) if im_size is None else (im_size, im_size)
    out = torch.empty((n, c, out_h, out_w), dtype=torch.float32, device=device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    for start in range(0, n, _CHUNK):
        # np.array copies: contiguous and writable (memory-mapped / frombuffer inputs are not)
        chunk = torch.from_numpy(np.array(x[start : start + _CHUNK])).to(device)
        chunk = chunk.to(torch.float32).div_(255.0)
        if (out_h, out_w) != (h, w):
            chunk = F.interpolate(
                chunk, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True
            )
        out[start : start + _CHUNK] = (chunk - m) / s
    return out
