"""CIFAR-10 / CIFAR-100 from the "python version" pickle batches, read with a restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

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

#: The only globals a CIFAR batch needs: numpy array / dtype / scalar reconstruction (numpy 1
#: and numpy 2 module names; ``_frombuffer`` is what protocol-5 pickles of numpy 2 use) and
#: ``_codecs.encode``, which Python 3 protocol-2 pickles use for raw bytes. None can run code.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR file safely; dict keys come back as ``str``.

    Raises:
        DatasetFormatError: unreadable file, a forbidden global, or not a dict.
    """
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetFormatError(f"{path}: refused or corrupt pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _as_str(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _read_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches: ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` labels."""
    xs, ys = [], []
    for path in paths:
        d = load_pickle(path)
        if "data" not in d or label_key not in d:
            raise DatasetFormatError(
                f"{path}: missing key 'data' or {label_key!r}; keys present: {sorted(d)}"
            )
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise DatasetFormatError(f"{path}: data {x.shape} / labels {y.shape}, expected (N, 3072) / (N,)")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _is_cifar10(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*_C10_TRAIN, "test_batch"))


def _find_cifar10(base: Path) -> Path | None:
    return first_match(base, ("cifar-10-batches-py", ""), _is_cifar10)


def _download_cifar10(target: Path) -> None:
    import torchvision.datasets as tvd

    tvd.CIFAR10(root=str(target), train=True, download=True)


def _load_cifar10(root: Path | None, allow_download: bool | None, im_size: int | None) -> RawSplits:
    del im_size
    folder = locate(
        "cifar10",
        root,
        _find_cifar10,
        files=[*_C10_TRAIN, "test_batch"],
        layouts="cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or those files directly",
        how_to_get="allow downloads (unset CONDENSE_OFFLINE) so torchvision fetches it, or "
        "extract cifar-10-python.tar.gz under dataset.root",
        download=_download_cifar10,
        allow_download=allow_download,
    )
    train_x, train_y = _read_batches([folder / f for f in _C10_TRAIN], "labels")
    test_x, test_y = _read_batches([folder / "test_batch"], "labels")
    names = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        meta = load_pickle(folder / "batches.meta")
        names = tuple(_as_str(n) for n in meta.get("label_names", names))
    return RawSplits(
        train_x,
        check_labels(train_y, len(names), str(folder / "data_batch_*")),
        test_x,
        check_labels(test_y, len(names), str(folder / "test_batch")),
        names,
        folder,
    )


# ----------------------------------------------------------------------------- CIFAR-100

CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
    lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)


def _is_cifar100(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("train", "test"))


def _find_cifar100(base: Path) -> Path | None:
    return first_match(base, ("cifar-100-python", ""), _is_cifar100)


def _download_cifar100(target: Path) -> None:
    import torchvision.datasets as tvd

    tvd.CIFAR100(root=str(target), train=True, download=True)


def _load_cifar100(root: Path | None, allow_download: bool | None, im_size: int | None) -> RawSplits:
    del im_size
    folder = locate(
        "cifar100",
        root,
        _find_cifar100,
        files=["train", "test"],
        layouts="cifar-100-python/ (train, test, meta) or those files directly",
        how_to_get="allow downloads (unset CONDENSE_OFFLINE) so torchvision fetches it, or "
        "extract cifar-100-python.tar.gz under dataset.root",
        download=_download_cifar100,
        allow_download=allow_download,
    )
    train_x, train_y = _read_batches([folder / "train"], "fine_labels")
    test_x, test_y = _read_batches([folder / "test"], "fine_labels")
    names = CIFAR100_CLASSES
    if (folder / "meta").is_file():
        meta = load_pickle(folder / "meta")
        names = tuple(_as_str(n) for n in meta.get("fine_label_names", names))
    return RawSplits(
        train_x,
        check_labels(train_y, len(names), str(folder / "train")),
        test_x,
        check_labels(test_y, len(names), str(folder / "test")),
        names,
        folder,
    )


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)

DATASETS.add(
    "cifar10",
    DatasetBuilder(DatasetInfo(3, 32, _CIFAR10_MEAN, _CIFAR10_STD, CIFAR10_CLASSES), _load_cifar10),
)
DATASETS.add(
    "cifar100",
    DatasetBuilder(DatasetInfo(3, 32, _CIFAR100_MEAN, _CIFAR100_STD, CIFAR100_CLASSES), _load_cifar100),
)
