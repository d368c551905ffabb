"""Single teachers: trained with the engine, cached, loaded in eval mode, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from condense.augment import DSA, default_strategy
from condense.errors import ArtifactError
from condense.models import create_model
from condense.teachers import _training as training
from condense.teachers import get_teacher, load_teacher, teacher_fit_config
from condense.teachers import teacher as teacher_mod
from condense.train import accuracy, fit
from tests.conftest import make_tiny_data

TINY = {"width": 8, "depth": 2}


@pytest.fixture
def data():
    return make_tiny_data(num_classes=4, per_class=16, test_per_class=6)


def _cfg(epochs=2):
    return teacher_fit_config(epochs, batch_size=16, lr=0.05)


def test_teacher_is_the_engines_model_in_eval_mode(data, tmp_path):
    net, manifest = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(), cache_dir=tmp_path, seed=3)
    ref = fit(lambda g: create_model("convnet_bn", 1, 4, (28, 28), generator=g, **TINY),
              (data.train_images, data.train_labels), _cfg(), seeds=[3], augment=DSA(default_strategy("tiny"))
              ).models[0]
    assert not net.training
    sd, ref_sd = net.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and any("running_mean" in k for k in sd)  # BatchNorm buffers kept
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    acc = accuracy(net, data.test_images, data.test_labels)[0]
    assert manifest["test_acc"] == pytest.approx(acc, abs=1e-3)
    assert len(manifest["test_acc_per_epoch"]) == 3 and manifest["epochs"] == 2
    assert manifest["fit"]["momentum"] == 0.9 and manifest["fit"]["schedule"] == "cosine"
    assert (manifest["model"], manifest["seed"]) == ({"name": "convnet_bn", "kwargs": TINY}, 3)
    again, m2 = load_teacher(next((tmp_path / "teachers").glob("tiny-convnet_bn-*")))
    assert not again.training and all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)
    assert m2["key"] == manifest["key"]


def test_cache_hit_seed_and_recipe_keys(data, tmp_path, monkeypatch):
    calls = []
    real = teacher_mod.train_model

    def counted(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(teacher_mod, "train_model", counted)
    _, m0 = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(1), cache_dir=tmp_path)
    _, again = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(1), cache_dir=tmp_path)
    assert calls == [0] and again["created"] == m0["created"]
    _, m1 = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(1), cache_dir=tmp_path, seed=1)
    _, m2 = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=teacher_fit_config(1, batch_size=16, lr=0.1),
                        cache_dir=tmp_path)
    assert calls == [0, 1, 0] and len({m0["key"], m1["key"], m2["key"]}) == 3
    with pytest.raises(ArtifactError, match="not in the cache"):
        get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(3), cache_dir=tmp_path, train=False)


def test_corrupted_weights_are_one_clear_error(data, tmp_path):
    get_teacher(data, "convnet", model_kwargs=TINY, cfg=_cfg(1), cache_dir=tmp_path)
    (entry,) = (tmp_path / "teachers").glob("tiny-convnet-*")
    w = entry / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    w.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="SHA-256") as e:
        get_teacher(data, "convnet", model_kwargs=TINY, cfg=_cfg(1), cache_dir=tmp_path)
    assert "\n" not in str(e.value) and f"delete {entry}" in str(e.value)


def test_momentum_teacher_resumes_with_the_same_bytes(data, tmp_path, monkeypatch):
    """SGD momentum buffers, BatchNorm statistics and the generator continue from the checkpoint."""
    _, full = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(3), cache_dir=tmp_path / "a")
    real_save = training.save_checkpoint

    def crash(path, payload):
        real_save(path, payload)
        if payload["fit"]["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(3), cache_dir=tmp_path / "b")
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    _, resumed = get_teacher(data, "convnet_bn", model_kwargs=TINY, cfg=_cfg(3), cache_dir=tmp_path / "b")
    assert resumed["files"] == full["files"]  # same SHA-256 of the weights
    assert (resumed["test_acc_per_epoch"], resumed["loss"]) == (full["test_acc_per_epoch"], full["loss"])
    (entry,) = (tmp_path / "b" / "teachers").glob("tiny-*")
    assert json.loads((entry / "manifest.json").read_text())["key"] == full["key"]
    assert not list((tmp_path / "b" / "teachers").glob(".work-*"))
