"""Expert trajectories: content, lazy reading, cache keys, corruption, resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condense.augment import DSA, default_strategy
from condense.errors import ArtifactError, ConfigError
from condense.models import create_model
from condense.teachers import (
    _store,
    balanced_subset,
    expert_fit_config,
    get_experts,
    load_expert,
    unflatten,
)
from condense.teachers import _training as training
from condense.teachers import experts as experts_mod
from condense.train import accuracy, fit
from tests.conftest import make_tiny_data

TINY = {"width": 8, "depth": 2}


@pytest.fixture
def data():
    return make_tiny_data(num_classes=4, per_class=16, test_per_class=6)


def _factory(spec):
    return lambda g: create_model("convnet", spec.channels, spec.num_classes, spec.im_size, generator=g, **TINY)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Counter:
    """Wraps the training function of the experts module and counts its calls."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        real = experts_mod.train_model

        def counted(data, recipe, seed, *a, **k):
            self.calls.append(seed)
            return real(data, recipe, seed, *a, **k)

        monkeypatch.setattr(experts_mod, "train_model", counted)


def test_trajectory_rows_are_the_engines_models(data, tmp_path):
    """Row 0 = the initialisation, row e = the engine's model after e epochs (same seed, same DSA)."""
    es = get_experts(data, 1, 2, model_kwargs=TINY, cache_dir=tmp_path, seed=7)
    traj = es[0].trajectory()
    init = _factory(data.spec)(torch.Generator().manual_seed(7))
    assert traj.shape == (3, sum(p.numel() for p in init.parameters())) == (3, es.num_params)
    assert torch.equal(traj[0], _flat(init))
    for e in (1, 2):
        ref = fit(_factory(data.spec), (data.train_images, data.train_labels), expert_fit_config(e), seeds=[7],
                  augment=DSA(default_strategy("tiny"))).models[0]
        assert torch.equal(traj[e], _flat(ref)), e
    assert not torch.equal(traj[1], traj[2])
    acc = accuracy(ref, data.test_images, data.test_labels)[0]
    assert es[0].test_acc[-1] == pytest.approx(acc, abs=1e-3) and len(es[0].test_acc) == 3
    m = es.manifest
    assert (m["seed"], m["epochs"], m["model"], m["augment"]) == (7, 2, {"name": "convnet", "kwargs": TINY},
                                                                   default_strategy("tiny"))
    assert m["fit"]["lr"] == 0.01 and m["fit"]["momentum"] == 0.0 and m["fit"]["weight_decay"] == 0.0
    assert m["fit"]["schedule"] == "constant" and m["fit"]["batch_size"] == 256
    assert [p["name"] for p in m["params"]] == [n for n, _ in init.named_parameters()]
    assert m["files"]["trajectory.safetensors"]["sha256"] == _store.sha256_file(es[0].path / "trajectory.safetensors")
    assert m["wall_s"] > 0 and len(m["code_key"]) == 16


def test_lazy_reads_equal_eager_and_unflatten(data, tmp_path, monkeypatch):
    es = get_experts(data, 1, 2, model_kwargs=TINY, cache_dir=tmp_path)
    eager = load_file(str(es[0].path / "trajectory.safetensors"))["trajectory"]
    # lazy: no whole-file read once the expert is opened without verification
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("whole file read"))
    monkeypatch.setattr(experts_mod, "safe_open", _spy_safe_open(experts_mod.safe_open, seen := []))
    lazy = load_expert(es.root, es[0].seed, verify=False)
    for e in range(3):
        assert torch.equal(lazy.params(e), eager[e])
    assert torch.equal(lazy.params_range(1, 3), eager[1:3])
    assert seen == ["trajectory"]  # one handle, rows through get_slice
    named = lazy.named_params(2)
    model = _factory(data.spec)(torch.Generator().manual_seed(0))
    assert [(n, tuple(t.shape)) for n, t in named.items()] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert torch.equal(torch.cat([t.reshape(-1) for t in named.values()]), eager[2])
    model.load_state_dict(named, strict=False)  # fits the model
    with pytest.raises(ConfigError, match=r"valid: 0\.\.2"):
        lazy.params(3)
    with pytest.raises(ConfigError, match="layout needs"):
        unflatten(eager[0][:-1], lazy.layout)


def _spy_safe_open(real, seen):
    class Spy:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def get_slice(self, name):
            seen.append(name)
            return self._f.get_slice(name)

    return Spy


def test_cache_hit_does_not_retrain_and_jobs_share_a_set(data, tmp_path, monkeypatch):
    count = Counter(monkeypatch)
    # two "jobs": expert 0 and expert 1 of a set with base seed 3
    get_experts(data, 1, 1, model_kwargs=TINY, cache_dir=tmp_path, seed=3)
    get_experts(data, 1, 1, model_kwargs=TINY, cache_dir=tmp_path, seed=4)
    assert count.calls == [3, 4]
    es = get_experts(data, 2, 1, model_kwargs=TINY, cache_dir=tmp_path, seed=3)
    assert count.calls == [3, 4] and [e.seed for e in es] == [3, 4]
    es3 = get_experts(data, 3, 1, model_kwargs=TINY, cache_dir=tmp_path, seed=3)
    assert count.calls == [3, 4, 5] and len(es3) == 3
    assert torch.equal(es3[1].params(1), es[1].params(1))
    with pytest.raises(ArtifactError, match="not in the cache.*condense-teachers"):
        get_experts(data, 4, 1, model_kwargs=TINY, cache_dir=tmp_path, seed=3, train=False)


def test_a_changed_recipe_gets_another_key(data, tmp_path, monkeypatch):
    def root(**kw):
        args = {"model_kwargs": TINY, "cache_dir": tmp_path, **kw}
        recipe = training.Recipe("convnet", args["model_kwargs"],
                                 args.get("cfg", expert_fit_config(args.get("epochs", 1))),
                                 training.resolve_augment(args.get("augment", "default"), "tiny"))
        return experts_mod.set_dir(tmp_path, args.get("data", data), recipe)[0]

    base = root()
    assert root() == base  # stable
    others = [root(epochs=2), root(cfg=expert_fit_config(1, lr=0.02)), root(augment="none"),
              root(model_kwargs={"width": 16, "depth": 2}), root(data=make_tiny_data(4, 16, 6, seed=1)),
              root(data=balanced_subset(data, 8))]
    assert len({base, *others}) == 1 + len(others)
    assert root(data=balanced_subset(data, 0, test_size=4)) == base  # the test split only scores
    # the code of the training path is part of the key (an unrelated file is not)
    extra = tmp_path / "fake_source.py"
    extra.write_text("x = 1\n")
    files = _store.code_files("convnet", True)
    monkeypatch.setattr(_store, "code_files", lambda model, augment: [*files, extra])
    monkeypatch.setattr(_store, "_PKG", Path("/"))  # relative paths from / for the fake file
    k1 = _store.code_key("convnet")
    extra.write_text("x = 2\n")
    assert _store.code_key("convnet") != k1
    names = {p.name for p in files}
    assert {"engine.py", "experts.py", "convnet.py", "_base.py", "dsa.py"} <= names
    assert "leaderboard.py" not in names and "runner.py" not in names


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_a_corrupted_file_is_one_clear_error(data, tmp_path, damage):
    es = get_experts(data, 1, 1, model_kwargs=TINY, cache_dir=tmp_path)
    path = es[0].path / "trajectory.safetensors"
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-3] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[:-8]))
    else:
        (es[0].path / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError) as e:
        get_experts(data, 1, 1, model_kwargs=TINY, cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(es[0].path) in msg and "delete" in msg
    assert {"flip": "SHA-256", "truncate": "bytes", "manifest": "not valid JSON"}[damage] in msg


def test_crash_after_an_epoch_resumes_with_the_same_bytes(data, tmp_path, monkeypatch):
    """An exception right after the epoch-1 checkpoint; the rerun continues from it (in process)."""
    full = get_experts(data, 1, 3, model_kwargs=TINY, cache_dir=tmp_path / "a", seed=2)
    real_save = training.save_checkpoint
    epochs_seen = []

    def crash(path, payload):
        real_save(path, payload)
        epochs_seen.append(payload["fit"]["epoch"])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(training, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        get_experts(data, 1, 3, model_kwargs=TINY, cache_dir=tmp_path / "b", seed=2)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    root = next((tmp_path / "b" / "experts").iterdir())
    assert epochs_seen == [1] and (root / ".work-seed2" / "checkpoint.pt").exists()
    assert not (root / "seed2").exists() and not list(root.glob(".tmp-*"))  # nothing half-written
    starts = []
    real_train = training.train

    def spy(*a, **k):
        out = real_train(*a, **k)
        starts.append(out.resumed_from)
        return out

    monkeypatch.setattr(experts_mod, "train_model", spy)
    resumed = get_experts(data, 1, 3, model_kwargs=TINY, cache_dir=tmp_path / "b", seed=2)
    assert starts == [1]
    assert (resumed[0].path / "trajectory.safetensors").read_bytes() == \
        (full[0].path / "trajectory.safetensors").read_bytes()
    a, b = (json.loads((e[0].path / "manifest.json").read_text()) for e in (full, resumed))
    assert (a["test_acc"], a["loss"], a["key"]) == (b["test_acc"], b["loss"], b["key"])
    assert not (root / ".work-seed2").exists()


def test_balanced_subset(data):
    sub = balanced_subset(data, train_size=8, test_size=4)
    assert sub.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and sub.test_labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(sub.train_images[2], data.train_images[16])  # first image of class 1
    assert balanced_subset(data) is not data and balanced_subset(data).train_images is data.train_images
    with pytest.raises(ConfigError, match="number of classes"):
        balanced_subset(data, train_size=3)


def test_bad_arguments(data, tmp_path):
    with pytest.raises(ConfigError, match="n .*>= 1"):
        get_experts(data, 0, 1, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="valid kwargs"):
        get_experts(data, 1, 1, model_kwargs={"wdth": 8}, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="valid ops"):
        get_experts(data, 1, 1, augment="zoom", cache_dir=tmp_path)


def test_two_callers_train_an_expert_once(data, tmp_path, monkeypatch):
    """Concurrent callers (threads here, processes alike: flock) wait for one trainer, then load."""
    import threading

    count = Counter(monkeypatch)
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        get_experts(data, 1, 1, model_kwargs=TINY, cache_dir=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert count.calls == [0] and len(out) == 2
    assert torch.equal(out[0][0].trajectory(), out[1][0].trajectory())
