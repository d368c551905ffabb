"""``condense-teachers``: one-line errors, a cached expert set, joblib multirun jobs filling one set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from condense.cli.teachers import job_from_config, precheck
from condense.errors import ConfigError
from tests.conftest import needs_fmnist

TEACHERS = [sys.executable, "-c", "from condense.cli.teachers import main; main()"]
TINY = ["+model.kwargs.width=8", "+model.kwargs.depth=2", "device=cpu"]


def _run(args, cwd, timeout=300):
    env = {**os.environ, "CONDENSE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(TEACHERS + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _image_folder(root: Path, classes: int = 3, train: int = 8, val: int = 4) -> Path:
    """A fabricated ImageFolder dataset: 16x16 PNGs with a class-specific bright square."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((16, 16, 3)) * 80).astype("uint8")
                a[c * 5:c * 5 + 5, c * 5:c * 5 + 5] = 250
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _folder_args(tmp_path: Path) -> list[str]:
    root = _image_folder(tmp_path / "img")
    return ["dataset=imagefolder", f"dataset.root={root}", "dataset.im_size=16", f"cache_dir={tmp_path / 'cache'}",
            *TINY]


def _load_folder(tmp_path: Path):
    from condense.data import build_dataset

    return build_dataset("imagefolder", root=tmp_path / "img", im_size=16)


@pytest.mark.parametrize("args, message", [
    (["kind=expert"], "unknown kind 'expert'; valid choices: experts, teacher"),
    (["n=0"], "n must be an integer >= 1, got 0"),
    (["model=nope"], "unknown model 'nope'; valid choices:"),
    (["bogus=1"], "unknown config key 'bogus'; the valid top-level keys are in conf/teachers.yaml"),
    (["train.optimizer=rmsprop"], "unknown optimizer 'rmsprop'; valid choices: sgd, adam, adamw"),
    (["augment=zoom"], "unknown DSA op(s) 'zoom'"),
    (["+model.kwargs.wdth=8"], "unknown kwarg 'wdth' for model 'convnet'; valid kwargs:"),
    (["expert=0,-1"], "expert must be an integer >= 0, got -1"),  # every sweep value is checked
    (["epochs=-2"], "epochs must be an integer >= 0"),
])
def test_precheck_names_the_bad_value(args, message):
    with pytest.raises(ConfigError) as e:
        precheck(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_per_kind():
    from condense.cli.build import compose

    experts = job_from_config(compose([], "teachers"))
    assert (experts.kind, experts.n, experts.fit.epochs, experts.fit.momentum, experts.fit.weight_decay,
            experts.fit.schedule, experts.fit.lr, experts.fit.batch_size) == ("experts", 10, 50, 0.0, 0.0,
                                                                               "constant", 0.01, 256)
    assert experts.augment == "color_crop_cutout_flip_scale_rotate" and experts.model == "convnet"
    teacher = job_from_config(compose(["kind=teacher", "model=resnet18_bn", "train.lr=0.05"], "teachers"))
    assert (teacher.model, teacher.fit.momentum, teacher.fit.schedule, teacher.fit.lr) == (
        "resnet18_bn", 0.9, "cosine", 0.05)


def test_bad_input_exits_2_with_one_line(tmp_path):
    r = _run(["n=0"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["condense-teachers: error: n must be an integer >= 1, got 0"]
    assert not (tmp_path / "runs").exists()


def test_experts_then_teacher_through_the_cli(tmp_path, monkeypatch):
    from condense.teachers import get_experts

    args = _folder_args(tmp_path)
    r = _run(["kind=experts", "n=2", "epochs=1", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "teachers.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["train_images"] == 24 and len(summary["test_acc"]) == 2
    data = _load_folder(tmp_path)
    es = get_experts(data, 2, 1, model_kwargs={"width": 8, "depth": 2}, cache_dir=tmp_path / "cache", train=False)
    assert str(es.root) == summary["path"] and [e.test_acc[-1] for e in es] == summary["test_acc"]
    r = _run(["kind=teacher", "model=convnet_bn", "epochs=1", "train.batch_size=8", *args,
              f"hydra.run.dir={tmp_path / 'run_t'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    (entry,) = (tmp_path / "cache" / "teachers").glob("imagefolder-convnet_bn-*")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["fit"]["batch_size"] == 8 and manifest["epochs"] == 1 and "test accuracy" in r.stdout


@pytest.mark.slow
def test_joblib_multirun_jobs_fill_one_set(tmp_path):
    """Two jobs (expert 0 and expert 1) in parallel processes; the set is later found whole."""
    from condense.teachers import get_experts

    args = _folder_args(tmp_path)
    r = _run(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "kind=experts", "n=1", "expert=0,1",
              "epochs=2", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = sorted((tmp_path / "sweep").glob("job*/teachers.json"))
    assert len(jobs) == 2  # one output folder per job
    seeds = sorted(json.loads(p.read_text())["seeds"][0] for p in jobs)
    assert seeds == [0, 1]
    es = get_experts(_load_folder(tmp_path), 2, 2, model_kwargs={"width": 8, "depth": 2},
                     cache_dir=tmp_path / "cache", train=False)
    assert [e.seed for e in es] == [0, 1] and es.epochs == 2


@pytest.mark.slow
@needs_fmnist
def test_real_fashion_mnist_subset(tmp_path):
    r = _run(["kind=experts", "dataset=fashion_mnist", "n=1", "epochs=2", "train_size=2000", "test_size=500",
              "train.batch_size=64", "train.lr=0.05", *TINY, f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "teachers.json").read_text())
    assert (summary["train_images"], summary["test_images"]) == (2000, 500)
    assert summary["test_acc"][0] > 40.0  # two epochs on 2000 images are far above chance (10 %)
