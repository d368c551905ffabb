import json

import pytest
import torch

from condense import artifacts
from condense.artifacts import export_imagefolder, export_tensors, load_synset, read_manifest, save_synset
from condense.errors import ArtifactError
from condense.types import SetMeta, SyntheticSet, class_major_labels
from tests.conftest import make_tiny_data


def _syn(soft=False, lr=None, ipc=3):
    spec = make_tiny_data().spec
    g = torch.Generator().manual_seed(1)
    n = spec.num_classes * ipc
    labels = (torch.randn(n, spec.num_classes, generator=g) if soft
              else class_major_labels(spec.num_classes, ipc))
    meta = SetMeta(dataset=spec, ipc=ipc, method="random", config={"a": 1}, seed=3)
    return SyntheticSet(images=torch.randn(n, 1, 28, 28, generator=g), labels=labels, meta=meta,
                        lr=None if lr is None else torch.tensor(lr))


@pytest.mark.parametrize("soft,lr", [(False, None), (True, 0.02)])
def test_roundtrip(tmp_path, soft, lr):
    syn = _syn(soft, lr)
    save_synset(syn, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"synset.safetensors", "manifest.json", "preview.png"}
    back = load_synset(tmp_path)
    assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    assert back.meta.dataset == syn.meta.dataset and back.meta.ipc == 3 and back.meta.seed == 3
    assert (back.lr is None) == (lr is None)
    if lr is not None:
        assert float(back.lr) == pytest.approx(lr)
    m = read_manifest(tmp_path)
    assert m["schema_version"] == 1 and m["class_order"] == [0, 1, 2, 3]
    assert m["dataset"]["mean"] == [0.5] and m["labels"] == ("soft" if soft else "hard")
    files = m["files"]
    assert m["storage_bytes"] == sum(f["bytes"] for f in files.values())
    assert all(len(f["sha256"]) == 64 for f in files.values())
    assert "git_sha" in m["code_version"]


def test_preview_has_one_row_per_class(tmp_path):
    from PIL import Image

    save_synset(_syn(ipc=3), tmp_path)
    im = Image.open(tmp_path / "preview.png")
    # 4 rows x 3 cols of 28px images with 2px padding
    assert im.size == (3 * 30 + 2, 4 * 30 + 2)


def test_tampered_file_is_refused(tmp_path):
    save_synset(_syn(), tmp_path)
    p = tmp_path / "synset.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_synset(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    save_synset(_syn(), tmp_path)
    p = tmp_path / "synset.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_synset(tmp_path)


def test_foreign_or_broken_manifest_is_refused(tmp_path):
    save_synset(_syn(), tmp_path)
    mp = tmp_path / "manifest.json"
    good = json.loads(mp.read_text())
    mp.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_synset(tmp_path)
    mp.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a condense manifest"):
        load_synset(tmp_path)
    mp.write_text(json.dumps({**good, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        load_synset(tmp_path)


def test_pickle_in_place_of_safetensors_is_refused(tmp_path, monkeypatch):
    """A file swapped for a pickle of the same size (with a manifest forged to match it) is refused
    by the safetensors parser and never unpickled."""
    import hashlib
    import pickle

    save_synset(_syn(), tmp_path)
    size = (tmp_path / "synset.safetensors").stat().st_size
    blob = pickle.dumps({"images": 1})
    blob += bytes(size - len(blob))  # padded to the real file's size (pickle ignores what follows STOP)
    (tmp_path / "synset.safetensors").write_bytes(blob)
    mp = tmp_path / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"]["synset.safetensors"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    m["storage_bytes"] = sum(f["bytes"] for f in m["files"].values())
    m["tensor_bytes"] = len(blob)
    mp.write_text(json.dumps(m))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_synset(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="not a condense artifact"):
        load_synset(tmp_path / "nope")


def test_crash_mid_save_leaves_no_valid_looking_artifact(tmp_path, monkeypatch):
    real = artifacts.atomic_write_bytes

    def crash(path, data):
        if path.name == "preview.png":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(artifacts, "atomic_write_bytes", crash)
    with pytest.raises(OSError):
        save_synset(_syn(), tmp_path)
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ArtifactError):
        load_synset(tmp_path)


def test_crash_over_old_artifact_is_detected(tmp_path, monkeypatch):
    save_synset(_syn(ipc=3), tmp_path)
    real = artifacts.atomic_write_bytes

    def crash(path, data):
        if path.name == "preview.png":
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(artifacts, "atomic_write_bytes", crash)
    new = _syn(ipc=3)
    new.images = new.images + 1
    with pytest.raises(OSError):
        save_synset(new, tmp_path)
    with pytest.raises(ArtifactError, match="SHA-256|bytes"):
        load_synset(tmp_path)


def test_shape_mismatch_is_refused(tmp_path):
    syn = _syn()
    syn.images = syn.images[:-1]
    with pytest.raises(ArtifactError, match="expected"):
        save_synset(syn, tmp_path)


def test_exports(tmp_path):
    syn = _syn(lr=0.01)
    export_tensors(syn, tmp_path / "t")
    imgs = torch.load(tmp_path / "t" / "images.pt", weights_only=True)
    labs = torch.load(tmp_path / "t" / "labels.pt", weights_only=True)
    res = torch.load(tmp_path / "t" / "res.pt", weights_only=True)
    lr = torch.load(tmp_path / "t" / "lr.pt", weights_only=True)
    assert torch.equal(imgs, syn.images) and torch.equal(labs, syn.labels)
    assert torch.equal(res["data"][0][0], syn.images) and float(lr) == pytest.approx(0.01)
    export_imagefolder(syn, tmp_path / "f")
    folders = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert folders == ["000-c0", "001-c1", "002-c2", "003-c3"]
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(tmp_path / "f"))
    assert len(ds) == 12 and [t for _, t in ds.samples] == syn.labels.tolist()


def _edit_manifest(run_dir, edit):
    mp = run_dir / "manifest.json"
    m = json.loads(mp.read_text())
    edit(m)
    mp.write_text(json.dumps(m))


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda m: m.update(ipc="3"), r"field ipc is '3', expected a positive integer"),
    (lambda m: m.update(ipc=4), r"field num_images is 12, expected 16 \(4 classes x ipc 4\)"),
    (lambda m: m["dataset"].update(mean=[0.6]), r"field normalization .* expected the dataset's mean and std"),
    (lambda m: m["dataset"].update(std=[0.0]), r"field dataset.std is \[0.0\], expected 1 finite number\(s\) > 0"),
    (lambda m: m.update(seed=-1), r"field seed is -1"),
    (lambda m: m.update(labels="soft"), r"tensor 'labels' is 'I64' \[12\], expected F32 \[12, 4\]"),
    (lambda m: m.update(learned_lr=0.5), r"no 'lr' tensor but the manifest records a learned lr"),
    (lambda m: m.update(storage_bytes=m["storage_bytes"] + 1), r"storage_bytes / tensor_bytes disagree"),
    (lambda m: m["files"].update({"../../etc/passwd": m["files"]["preview.png"]}), r"unknown file '../../etc/passwd'"),
    (lambda m: m.pop("extra"), r"lacks field\(s\) extra"),
])
def test_edited_manifest_fields_are_refused_by_name(tmp_path, edit, pattern):
    save_synset(_syn(), tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ArtifactError, match=pattern) as err:
        load_synset(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_huge_sizes_are_refused_before_the_synset_is_read(tmp_path, monkeypatch):
    """A declared size of 10^15 for an unchanged file, and a file that really is a terabyte (sparse)
    under a manifest forged to say so, are both refused without opening the synset."""
    import os
    from pathlib import Path

    save_synset(_syn(), tmp_path)
    real_open = Path.open

    def guarded_open(self, *args, **kwargs):
        assert self.name != "synset.safetensors", "the synset was opened"
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded_open)

    def declare(size):
        def edit(m):
            m["files"]["synset.safetensors"]["bytes"] = m["tensor_bytes"] = size
            m["storage_bytes"] = sum(f["bytes"] for f in m["files"].values())
        return edit

    _edit_manifest(tmp_path, declare(10**15))
    with pytest.raises(ArtifactError, match="declares 1000000000000000 bytes"):
        load_synset(tmp_path)
    os.truncate(tmp_path / "synset.safetensors", 2**40)
    _edit_manifest(tmp_path, declare(2**40))
    with pytest.raises(ArtifactError, match="declares 1099511627776 bytes"):
        load_synset(tmp_path)


def test_forged_dtype_is_refused(tmp_path):
    """Images re-saved as float64 under a manifest forged to match are not the original data."""
    import hashlib

    from safetensors.torch import save as st_save

    syn = _syn()
    save_synset(syn, tmp_path)
    blob = st_save({"images": syn.images.double(), "labels": syn.labels},
                   metadata={"format": "condense.synthetic-set;schema_version=1"})
    (tmp_path / "synset.safetensors").write_bytes(blob)

    def forge(m):
        m["files"]["synset.safetensors"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
        m["tensor_bytes"] = len(blob)
        m["storage_bytes"] = sum(f["bytes"] for f in m["files"].values())

    _edit_manifest(tmp_path, forge)
    with pytest.raises(ArtifactError, match=r"tensor 'images' is 'F64' \[12, 1, 28, 28\], expected F32"):
        load_synset(tmp_path)
