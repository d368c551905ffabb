"""Dataset builders on files fabricated in their real on-disk formats (no download, no real data)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from condense.data import DATASETS, DatasetFormatError, build_dataset, get_spec
from condense.data import mnist as mnist_mod
from condense.data._common import allow_download_default
from condense.errors import DatasetNotFoundError, UnknownNameError

FMNIST_MEAN, FMNIST_STD = 0.2861, 0.3530
C10_MEAN = (0.4914, 0.4822, 0.4465)
C10_STD = (0.2023, 0.1994, 0.2010)
IMNET_MEAN = (0.485, 0.456, 0.406)
IMNET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real files, no env root, offline, download cache inside tmp_path."""
    monkeypatch.delenv("CONDENSE_DATA_ROOT", raising=False)
    monkeypatch.setenv("CONDENSE_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for key in list(mnist_mod.SYSTEM_DIRS):
        monkeypatch.setitem(mnist_mod.SYSTEM_DIRS, key, tmp_path / "no-such-system-dir" / key)


# ----------------------------------------------------------------------------- fabricators


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    """Write ``arr`` (uint8) in IDX format: 0x0000, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_dataset(folder: Path, n_train: int = 20, n_test: int = 10, compress: bool = True):
    """Images whose every pixel equals ``20 * label + index % 3`` (so labels are checkable)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = (20 * y + np.arange(n) % 3).astype(np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, compress)
        out[prefix] = (x, y)
    return out


def make_cifar10(folder: Path, per_batch: int = 4, protocol: int = 2) -> np.ndarray:
    """CIFAR-10 python batches with bytes keys (as the original Python-2 files decode)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        d = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh, protocol=protocol)
        if first is None:
            first = (data, labels)
    names = [
        n.encode()
        for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh, protocol=protocol)
    return first


def make_cifar100(folder: Path) -> tuple[np.ndarray, list[int]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    fine = [f"class_{i:03d}" for i in range(100)]
    result = None
    for name, n in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, size=n)]
        d = {
            "data": data,
            "fine_labels": labels,
            "coarse_labels": [0] * n,
            "filenames": ["f"] * n,
            "batch_label": name,
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
        result = result or (data, labels)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": ["c"] * 20}, fh)
    return result


def solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    im = Image.new("RGB", size, rgb)
    if mode == "L":
        im = im.convert("L")
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    im.save(path, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))


# ----------------------------------------------------------------------------- IDX


def test_fashion_mnist_from_root_normalized_with_labels(tmp_path: Path) -> None:
    src = make_idx_dataset(tmp_path / "fm")
    data = build_dataset("fashion_mnist", tmp_path / "fm", allow_download=False)
    assert data.train_images.shape == (20, 1, 28, 28) and data.test_images.shape == (10, 1, 28, 28)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    expected = (torch.from_numpy(src["train"][0]).float()[:, None] / 255 - FMNIST_MEAN) / FMNIST_STD
    torch.testing.assert_close(data.train_images, expected)
    assert data.train_labels.tolist() == src["train"][1].tolist()
    assert data.test_labels.tolist() == src["t10k"][1].tolist()
    spec = data.spec
    assert spec.name == "fashion_mnist" and spec.channels == 1 and spec.im_size == (28, 28)
    assert spec.class_names[0] == "T-shirt/top" and spec.class_names[9] == "Ankle boot"
    assert spec.mean == (FMNIST_MEAN,) and spec.std == (FMNIST_STD,)


@pytest.mark.parametrize("sub", ["fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_sub_layouts_and_uncompressed(tmp_path: Path, sub: str) -> None:
    make_idx_dataset(tmp_path / "root" / sub, compress=False)
    data = build_dataset("fashion_mnist", str(tmp_path / "root"), allow_download=False)
    assert data.train_images.shape == (20, 1, 28, 28)


def test_env_root_and_system_dir_are_searched_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No root: $CONDENSE_DATA_ROOT first, then the system folder; data.root says which."""
    make_idx_dataset(tmp_path / "env" / "fashion-mnist")
    make_idx_dataset(tmp_path / "sys", n_train=30)
    monkeypatch.setitem(mnist_mod.SYSTEM_DIRS, "fashion_mnist", tmp_path / "sys")
    monkeypatch.setenv("CONDENSE_DATA_ROOT", str(tmp_path / "env"))
    data = build_dataset("fashion_mnist", allow_download=False)
    assert data.train_labels.numel() == 20 and data.root == str(tmp_path / "env" / "fashion-mnist")
    monkeypatch.delenv("CONDENSE_DATA_ROOT")
    data = build_dataset("fashion_mnist", allow_download=False)
    assert data.train_labels.numel() == 30 and data.root == str(tmp_path / "sys")
    assert data.to("cpu").root == data.root


def test_download_cache_is_searched_without_root(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "xdg-cache" / "condense" / "data" / "FashionMNIST" / "raw", n_train=40)
    data = build_dataset("fashion_mnist", allow_download=False)
    assert data.train_labels.numel() == 40
    assert data.root == str(tmp_path / "xdg-cache" / "condense" / "data" / "FashionMNIST" / "raw")


def test_explicit_empty_root_is_an_error_even_with_other_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit root without the files never falls back to the env root, the system copy or
    the download cache (all three hold valid files here)."""
    make_idx_dataset(tmp_path / "sys")
    make_idx_dataset(tmp_path / "env")
    make_idx_dataset(tmp_path / "xdg-cache" / "condense" / "data")
    monkeypatch.setitem(mnist_mod.SYSTEM_DIRS, "fashion_mnist", tmp_path / "sys")
    monkeypatch.setenv("CONDENSE_DATA_ROOT", str(tmp_path / "env"))
    assert build_dataset("fashion_mnist", allow_download=False).root == str(tmp_path / "env")  # sanity
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("fashion_mnist", empty, allow_download=False)
    msg = str(err.value)
    assert f"dataset.root={empty}" in msg
    for stem in mnist_mod.IDX_FILES:
        assert stem in msg
    assert str(tmp_path / "sys") not in msg and "download disabled" in msg.lower()
    with pytest.raises(DatasetNotFoundError, match=f"dataset.root={tmp_path / 'missing'}"):
        build_dataset("fashion_mnist", tmp_path / "missing", allow_download=False)


def test_explicit_root_failed_download_does_not_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads allowed: they go into the explicit root; when that fails, the error names the
    root, and the system copy is not used."""
    import torchvision.datasets as tvd

    def boom(**kwargs: object) -> None:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(tvd, "FashionMNIST", boom)
    make_idx_dataset(tmp_path / "sys")
    monkeypatch.setitem(mnist_mod.SYSTEM_DIRS, "fashion_mnist", tmp_path / "sys")
    with pytest.raises(DatasetNotFoundError, match="network unreachable") as err:
        build_dataset("fashion_mnist", tmp_path / "mine", allow_download=True)
    assert f"dataset.root={tmp_path / 'mine'}" in str(err.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("cifar10", ["data_batch_1", "data_batch_5", "test_batch"]),
        ("cifar100", ["train", "test"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
        ("tiny_imagenet", ["wnids.txt", "train/"]),
    ],
)
def test_explicit_root_error_names_root_and_files(tmp_path: Path, name: str, expected: list[str]) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, tmp_path, allow_download=False)
    msg = str(err.value)
    assert f"dataset.root={tmp_path}" in msg
    for f in expected:
        assert f in msg


def test_root_recorded_for_every_builder(tmp_path: Path) -> None:
    """``RealData.root`` is the folder the files were read from, for each file format."""
    import scipy.io

    fm_raw = tmp_path / "fm" / "FashionMNIST" / "raw"
    make_idx_dataset(fm_raw)
    assert build_dataset("fashion_mnist", tmp_path / "fm").root == str(fm_raw)
    make_idx_dataset(tmp_path / "mn")
    assert build_dataset("mnist", tmp_path / "mn").root == str(tmp_path / "mn")
    make_cifar10(tmp_path / "c10" / "cifar-10-batches-py")
    assert build_dataset("cifar10", tmp_path / "c10").root == str(tmp_path / "c10" / "cifar-10-batches-py")
    make_cifar100(tmp_path / "c100" / "cifar-100-python")
    assert build_dataset("cifar100", tmp_path / "c100").root == str(tmp_path / "c100" / "cifar-100-python")
    (tmp_path / "sv").mkdir()
    for split in ("train", "test"):
        x = np.zeros((32, 32, 3, 2), dtype=np.uint8)
        y = np.array([[1], [10]], np.uint8)
        scipy.io.savemat(tmp_path / "sv" / f"{split}_32x32.mat", {"X": x, "y": y})
    assert build_dataset("svhn", tmp_path / "sv").root == str(tmp_path / "sv")
    tiny = make_tiny(tmp_path / "tin")
    assert build_dataset("tiny_imagenet", tmp_path / "tin", im_size=8).root == str(tiny)
    make_folder(tmp_path / "imf")
    assert build_dataset("imagefolder", tmp_path / "imf", im_size=8).root == str(tmp_path / "imf")


def test_relative_root_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_dataset(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    data = build_dataset("fashion_mnist", "rel", allow_download=False)
    assert data.root == str(tmp_path / "rel")


def test_mnist_resize_and_spec(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path / "MNIST" / "raw")
    data = build_dataset("mnist", tmp_path, allow_download=False, im_size=32)
    assert data.train_images.shape == (20, 1, 32, 32) and data.spec.im_size == (32, 32)
    assert data.spec.mean == (0.1307,) and data.spec.class_names == tuple("0123456789")
    # constant images stay constant through the antialiased resize
    first = data.train_images[0]
    torch.testing.assert_close(first, torch.full_like(first, (0 / 255 - 0.1307) / 0.3081))


def test_missing_dataset_one_error_with_instructions(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("fashion_mnist", allow_download=False)
    msg = str(err.value)
    assert "no-such-system-dir" in msg and str(tmp_path / "xdg-cache") in msg
    assert "train-images-idx3-ubyte" in msg and "CONDENSE_DATA_ROOT unset" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "scripts/get_data.sh" in msg
    assert "dataset.root=PATH" in msg and "download disabled" in msg.lower()
    bogus = tmp_path / "bogus"
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("fashion_mnist", bogus, allow_download=False)
    msg = str(err.value)
    assert str(bogus) in msg and "no-such-system-dir" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download disabled" in msg.lower()


def test_offline_env_disables_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDENSE_OFFLINE", "1")
    assert allow_download_default(None) is False and allow_download_default(True) is True
    monkeypatch.delenv("CONDENSE_OFFLINE")
    assert allow_download_default(None) is True and allow_download_default(False) is False


def test_download_fallback_uses_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake torchvision class writes the files where the real one would (no network)."""
    import torchvision.datasets as tvd

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            raw = Path(root) / "FashionMNIST" / "raw"
            if not raw.exists():
                make_idx_dataset(raw)

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    data = build_dataset("fashion_mnist", tmp_path / "dl", allow_download=True)
    assert data.train_labels.numel() == 20 and calls[0][0] == str(tmp_path / "dl")


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def boom(**kwargs: object) -> None:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(tvd, "FashionMNIST", boom)
    with pytest.raises(DatasetNotFoundError, match="network unreachable"):
        build_dataset("fashion_mnist", allow_download=True)
    assert (tmp_path / "xdg-cache" / "condense" / "data").is_dir()  # default download target


def test_corrupt_idx_names_the_file(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path, compress=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bad.read_bytes()[4:])
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.*magic"):
        build_dataset("fashion_mnist", tmp_path, allow_download=False)
    make_idx_dataset(tmp_path, compress=False)
    bad.write_bytes(bad.read_bytes()[:-5])  # truncated payload
    with pytest.raises(DatasetFormatError, match="payload"):
        build_dataset("fashion_mnist", tmp_path, allow_download=False)


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches(tmp_path: Path, protocol: int) -> None:
    data0, labels0 = make_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = build_dataset("cifar10", tmp_path, allow_download=False)
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    mean = torch.tensor(C10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C10_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(data0).float().view(-1, 3, 32, 32) / 255 - mean) / std
    torch.testing.assert_close(data.train_images[:4], expected)
    assert data.train_labels[:4].tolist() == labels0
    assert data.spec.class_names[1] == "automobile" and data.spec.num_classes == 10


def test_cifar100_meta_names(tmp_path: Path) -> None:
    data0, labels0 = make_cifar100(tmp_path / "cifar-100-python")
    data = build_dataset("cifar100", tmp_path, allow_download=False)
    assert data.train_images.shape == (6, 3, 32, 32) and data.test_labels.shape == (3,)
    assert data.train_labels.tolist() == labels0
    assert data.spec.class_names[7] == "class_007" and data.spec.num_classes == 100
    assert data.spec.mean == (0.5071, 0.4866, 0.4409)
    # the fixed spec needs no file and lists the real names
    assert get_spec("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, fh)
    with pytest.raises(DatasetFormatError, match="system"):
        build_dataset("cifar10", tmp_path, allow_download=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- SVHN


def test_svhn_mat(tmp_path: Path) -> None:
    import scipy.io

    rng = np.random.default_rng(2)
    for split, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4], [5], [9]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            x_train = x
    data = build_dataset("svhn", tmp_path, allow_download=False)
    assert data.train_images.shape == (7, 3, 32, 32) and data.test_images.shape == (5, 3, 32, 32)
    assert data.train_labels.tolist() == [0, 1, 2, 3, 4, 5, 9]  # 10 means digit 0
    mean = torch.tensor((0.4377, 0.4438, 0.4728)).view(3, 1, 1)
    std = torch.tensor((0.1980, 0.2010, 0.1970)).view(3, 1, 1)
    img2 = torch.from_numpy(x_train[:, :, :, 2]).permute(2, 0, 1).float() / 255  # HWC -> CHW
    torch.testing.assert_close(data.train_images[2], (img2 - mean) / std)
    assert data.spec.class_names == tuple("0123456789")


# ----------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n02", "n01", "n03"]  # wnids.txt order is not the class order: sorted wnids are
COLOURS = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}


def make_tiny(base: Path, with_words: bool = True) -> Path:
    root = base / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    if with_words:
        (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tkoala\nn99\tother\n")
    for w in WNIDS:
        img_dir = root / "train" / w / "images"
        img_dir.mkdir(parents=True)
        for i in range(2):
            solid(img_dir / f"{w}_{i}.JPEG", COLOURS[w], (64, 64))
    ann = []
    for i, w in enumerate(["n03", "n01", "n01", "n02"]):
        solid(root / "val" / "images" / f"val_{i}.JPEG", COLOURS[w], (64, 64), mode="L" if i == 0 else "RGB")
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    make_tiny(tmp_path)
    data = build_dataset("tiny_imagenet", tmp_path, allow_download=False)
    assert data.train_images.shape == (6, 3, 64, 64) and data.test_images.shape == (4, 3, 64, 64)
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.test_labels.tolist() == [2, 0, 0, 1]
    assert data.spec.class_names == ("goldfish, Carassius auratus", "koala", "n03")
    assert data.spec.mean == IMNET_MEAN and data.spec.std == IMNET_STD
    # class n01 is red: denormalized pixels ~ (250, 0, 0) / 255 (JPEG is near-lossless here)
    rgb = data.spec.denormalize(data.train_images[:1]).mean((0, 2, 3))
    torch.testing.assert_close(rgb, torch.tensor([250.0, 0.0, 0.0]) / 255, atol=0.02, rtol=0)
    assert get_spec("tiny_imagenet", tmp_path).class_names == data.spec.class_names


def test_tiny_imagenet_without_words_uses_wnids(tmp_path: Path) -> None:
    make_tiny(tmp_path, with_words=False)
    assert get_spec("tiny_imagenet", tmp_path / "tiny-imagenet-200").class_names == ("n01", "n02", "n03")


def test_tiny_imagenet_missing_mentions_how_to_get(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200.zip"):
        build_dataset("tiny_imagenet", tmp_path)


# ----------------------------------------------------------------------------- ImageFolder


def make_folder(root: Path, test_name: str = "val") -> None:
    colours = {"cat": (200, 100, 0), "dog": (0, 50, 150)}
    for split, n in (("train", 3), (test_name, 1)):
        for cls, rgb in colours.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                solid(d / f"{i}.png", rgb, (10 + i, 12))  # odd, non-square sizes
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder(tmp_path: Path, test_name: str) -> None:
    make_folder(tmp_path, test_name)
    data = build_dataset("imagefolder", tmp_path, allow_download=False, im_size=8)
    assert data.train_images.shape == (6, 3, 8, 8) and data.test_images.shape == (2, 3, 8, 8)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and data.test_labels.tolist() == [0, 1]
    assert data.spec.class_names == ("cat", "dog") and data.spec.im_size == (8, 8)
    mean = torch.tensor(IMNET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMNET_STD).view(3, 1, 1)
    expected = (torch.tensor([0.0, 50.0, 150.0]).view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(data.train_images[3], expected.expand(3, 8, 8), atol=1e-5, rtol=0)
    assert get_spec("imagefolder", tmp_path).class_names == ("cat", "dog")


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="dataset.root"):
        build_dataset("imagefolder")
    (tmp_path / "train" / "a").mkdir(parents=True)
    solid(tmp_path / "train" / "a" / "x.png", (1, 2, 3), (4, 4))
    with pytest.raises(DatasetNotFoundError, match="neither val/ nor test/"):
        build_dataset("imagefolder", tmp_path)
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"only in train \['a'\]"):
        build_dataset("imagefolder", tmp_path)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_unknown() -> None:
    assert DATASETS.names() == sorted(
        ["fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "imagefolder"]
    )
    with pytest.raises(UnknownNameError, match="fashion_mnist") as err:
        build_dataset("fashion-mnist")
    assert "valid choices" in str(err.value)
    with pytest.raises(UnknownNameError):
        get_spec("imagenet-1k")


def test_fixed_specs_need_no_files() -> None:
    spec = get_spec("cifar10")
    assert spec.channels == 3 and spec.im_size == (32, 32) and spec.num_classes == 10
    assert spec.mean == C10_MEAN and spec.std == C10_STD
    assert get_spec("fashion_mnist", im_size=32).im_size == (32, 32)
    assert get_spec("svhn").std == (0.1980, 0.2010, 0.1970)


def test_records_name_the_data_folder_portably(tmp_path, monkeypatch):
    """``describe_root``: the distribution package's folder as ``<system>/<name>``, a folder under
    the working directory relative to it, anything else absolute: no machine's checkout in a record."""
    from condense.data import describe_root
    from condense.data.mnist import SYSTEM_DIRS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "fm").mkdir(parents=True)
    system = SYSTEM_DIRS["fashion_mnist"]  # (other tests of this file may point it at a fabricated copy)
    assert describe_root(system) == f"<system>/{system.name}"
    assert describe_root(tmp_path / "data" / "fm") == "data/fm"
    assert describe_root("/opt/elsewhere/fm") == "/opt/elsewhere/fm"
