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


def test_pickle_in_place_of_safetensors_is_refused(tmp_path):
    """A file swapped for a pickle (with a matching manifest) is still never unpickled."""
    import hashlib
    import pickle

    save_synset(_syn(), tmp_path)
    blob = pickle.dumps({"images": 1})
    (tmp_path / "synset.safetensors").write_bytes(blob)
    mp = tmp_path / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"]["synset.safetensors"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    mp.write_text(json.dumps(m))
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
