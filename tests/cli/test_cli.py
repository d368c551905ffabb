"""The Hydra CLI: every config combination composes and builds; bad input -> one line, exit 2."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from condense.cli.build import compose
from condense.cli.main import CONF_DIR, group_choices
from condense.config import eval_config, method_config, resolve_iterations, run_config, validate
from condense.errors import ConfigError
from condense.runtime import native_bf16
from tests.conftest import FMNIST_DIR, needs_fmnist

CONDENSE = [sys.executable, "-c", "from condense.cli.main import main; main()"]
CONDENSE_EVAL = [sys.executable, "-c", "from condense.cli.main import eval_main; eval_main()"]


def _env():
    return {**os.environ, "CONDENSE_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}


def _run(args, cwd, cmd=CONDENSE, timeout=300):
    return subprocess.run(cmd + list(args), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_every_combination_composes_and_builds():
    groups = {g: group_choices(g) for g in ("method", "dataset", "model", "eval", "budget", "logger")}
    assert {"random", "herding", "kcenter"} <= set(groups["method"])
    assert (CONF_DIR / "config.yaml").is_file()
    n = 0
    # all methods x budgets x ipcs with the default rest; then every other group's choices
    for method, budget, ipc in itertools.product(groups["method"], groups["budget"], [1, 10, 50]):
        built = validate(compose([f"method={method}", f"budget={budget}", f"ipc={ipc}"]))
        assert built.iterations >= 0 and built.eval.num_models >= 1
        n += 1
    for g in ("dataset", "model", "eval", "logger"):
        for choice in groups[g]:
            extra = ["dataset.root=/x"] if g == "dataset" and choice == "imagefolder" else []
            validate(compose([f"{g}={choice}", "ipc=1", *extra]))
            n += 1
    assert n > 30


def test_budget_resolution():
    cfg = compose(["method=random", "budget=cpu", "ipc=50"])
    e = eval_config(cfg)
    assert (e.epochs, e.num_models, e.dsa) == (300, 3, True)
    cfg = compose(["method=herding", "budget=smoke"])
    m = method_config(cfg)
    assert m.feature_train_size == 500  # the budget's method override
    assert resolve_iterations(cfg, m) == 0
    cfg = compose(["budget=smoke", "eval.epochs=7"])
    assert eval_config(cfg).epochs == 7  # explicit beats the budget


def test_budget_per_ipc_overrides_and_deadline():
    """cpu: method settings with per-ipc sub-tables, a wall-clock cap per ipc, published iteration cap."""
    bf16 = native_bf16("cpu")  # the default precision on this CPU (no explicit precision)
    for ipc, batch, inner, secs in ((1, 128, None, 900.0), (10, 128, 10, 900.0), (50, 64, 5, 1800.0)):
        cfg = compose(["method=dsa", "budget=cpu", f"ipc={ipc}", "device=cpu"])
        m = method_config(cfg)
        assert (m.batch_real, m.inner_loop, m.bf16, m.compile) == (batch, inner, bf16, True)
        assert run_config(cfg, None, []).max_seconds == secs
        table = cfg["budget"]["iterations"].get("dsa", {}).get(f"ipc{ipc}")
        assert resolve_iterations(cfg, m) == (table or 1000)  # table, else the published cap
    cfg = compose(["method=dsa", "budget=cpu", "ipc=1", "++budget.iterations.dsa.ipc1=7"])
    assert resolve_iterations(cfg, method_config(cfg)) == 7  # the budget's table beats the published cap
    cfg = compose(["method=dsa", "budget=cpu", "ipc=1", "++budget.iterations.dsa.ipc1=7", "iterations=3"])
    assert resolve_iterations(cfg, method_config(cfg)) == 3  # ... and the command line beats the table
    cfg = compose(["method=dsa", "budget=cpu", "ipc=10", "max_seconds=5", "method.batch_real=32"])
    assert run_config(cfg, None, []).max_seconds == 5.0  # the command line beats the budget
    assert method_config(cfg, explicit={"batch_real"}).batch_real == 32  # ... for method.* too
    assert method_config(cfg, explicit=set()).batch_real == 128
    cfg = compose(["method=dm", "budget=demo", "ipc=10", "device=cpu"])
    m = method_config(cfg)
    assert resolve_iterations(cfg, m) == 1000 and run_config(cfg, None, []).max_seconds == 300.0
    assert (m.bf16, m.compile) == (bf16, True)


def test_precision_default_follows_the_isa_never_a_timing(monkeypatch):
    """No ``precision``: bf16 exactly where the CPU has AVX-512 BF16 or AMX, whatever a timing
    says (the bf16 probe is made to fail if anything calls it); explicit choices win; the record's
    source says which; ``bf16: auto`` is gone (one line naming the choices)."""
    import torch

    import condense.runtime as rt
    from condense.config import validate

    def no_timing(*args, **kwargs):
        raise AssertionError("the precision must not depend on a timing")

    monkeypatch.setattr(rt, "bf16_speedup", no_timing)
    for avx512bf16, amx, want in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        for method, budget in (("dc", "cpu"), ("dm", "smoke"), ("dsa", "paper"), ("datadam", "demo")):
            built = validate(compose([f"method={method}", f"budget={budget}", "ipc=1", "device=cpu"]))
            assert built.method.bf16 is want, (method, budget)
            assert built.precision.to_dict() == {"value": "bf16" if want else "fp32", "source": "default"}
        for prec in ("fp32", "bf16"):  # an explicit precision beats the ISA
            built = validate(compose(["method=dm", "ipc=1", "device=cpu", f"precision={prec}"]))
            assert built.method.bf16 is (prec == "bf16") and built.precision.source == "explicit"
        built = validate(compose(["method=dm", "ipc=1", "device=cpu", "method.bf16=false"]), {"bf16"})
        assert built.method.bf16 is False and built.precision.to_dict() == {"value": "fp32", "source": "explicit"}
        built = validate(compose(["method=random", "ipc=1", "device=cpu"]))
        assert built.precision.to_dict() == {"value": "fp32", "source": "fixed"}  # no networks in autocast
    for bad, needle in (("method.bf16=auto", "method.bf16 must be true, false or null (null: the run's "
                                             "precision), got 'auto'; for the device's default set "
                                             "precision=null, to choose set precision=fp32 or precision=bf16"),
                        ("precision=fp16", "precision must be one of fp32, bf16 or null"),
                        ("precision=auto", "precision must be one of fp32, bf16 or null")):
        with pytest.raises(ConfigError) as e:
            validate(compose(["method=dm", "ipc=1", bad]), {"bf16"})
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="precision=fp32 contradicts method.bf16=true"):
        validate(compose(["method=dm", "ipc=1", "precision=fp32", "method.bf16=true"]), {"bf16"})
    assert native_bf16("meta") is False
    values = [ln.split("#")[0] for p in CONF_DIR.rglob("*.yaml") for ln in p.read_text().splitlines()]
    assert not [v for v in values if "bf16" in v and "auto" in v]  # no config asks for bf16: auto


@pytest.mark.parametrize(
    "args, needle",
    [
        (["method=nosuch"], "unknown method 'nosuch'; valid choices: "),
        (["dataset=cifar11"], "unknown dataset 'cifar11'; valid choices: "),
        (["model=resnet99"], "unknown model 'resnet99'; valid choices: "),
        (["budget=huge"], "unknown budget 'huge'; valid choices: "),
        (["nosuchkey=1"], "unknown config key 'nosuchkey'"),
        (["+method.bogus=1"], "unknown key(s) 'bogus' in method; valid keys: "),
        (["ipc=0"], "ipc must be an integer >= 1, got 0"),
        (["ipc=6001"], "ipc 6001 exceeds the smallest class of fashion_mnist (6000 training images)"),
        (["max_seconds=0"], "max_seconds must be > 0"),
        (["eval.archs=[convnet,nonet]"], "unknown model 'nonet'"),
        (["-m", "method=random,nosuch"], "unknown method 'nosuch'"),
        (["export=[zip]"], "unknown export 'zip'; valid choices: imagefolder, tensors"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, needle):
    out = tmp_path / "run"
    r = _run([*args, f"hydra.run.dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("condense: error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "sweep").exists()


def test_missing_dataset_is_one_clear_error(tmp_path):
    r = _run(["dataset=cifar10", "dataset.root=/nonexistent", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path,
             timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("condense: error")]
    assert len(lines) == 1 and "cifar" in lines[0].lower()
    assert not (tmp_path / "r").exists()


SELECTION = ("random", "herding", "kcenter")
SMOKE = [(m, False) for m in ("random", "herding", "kcenter", "dc", "dsa", "dm", "datadam")] + [
    (m, True) for m in ("dsa", "dm", "datadam")]


@needs_fmnist
@pytest.mark.parametrize("method,flip", SMOKE, ids=[m + ("+flip" if f else "") for m, f in SMOKE])
def test_smoke_run_through_the_cli(tmp_path, method, flip):
    out = tmp_path / "run"
    extra = ["method.flip=true"] if flip else []
    r = _run([f"method={method}", "ipc=1", "budget=smoke", f"hydra.run.dir={out}",
              f"cache_dir={tmp_path / 'cache'}", "export=[tensors]", *extra], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("synset.safetensors", "manifest.json", "preview.png", "eval.json", "result.json"):
        assert (out / f).exists(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["summary"]["convnet"]["n"] == 1 and 0 <= ev["runs"][0]["test_acc"] <= 100
    assert "accuracy (convnet" in r.stdout and f"artifact: {out}" in r.stdout
    res = json.loads((out / "result.json").read_text())
    assert res["kind"] == "accuracy" and res["method"] == method and res["ipc"] == 1
    assert res["flip"] == flip and res["distill"]["iterations"] >= (0 if method in SELECTION else 1)
    assert (out / "export-tensors" / "images.pt").exists()
    if method != "random":
        return
    # condense-eval on the artifact
    r2 = _run([f"artifact={out}", "budget=smoke", f"out={tmp_path / 'e.json'}"], cwd=tmp_path, cmd=CONDENSE_EVAL)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["summary"]["convnet"]["n"] == 1


PRUNING = ("grand", "el2n", "forgetting")


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("method", PRUNING)
def test_pruning_smoke_run_through_the_cli(tmp_path, method):
    """The issue's acceptance command: ``condense method=<m> dataset=fashion_mnist ipc=10 budget=smoke``."""
    out = tmp_path / "run"
    r = _run([f"method={method}", "dataset=fashion_mnist", "ipc=10", "budget=smoke", f"hydra.run.dir={out}",
              f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == method and res["ipc"] == 10 and res["distill"]["iterations"] == 0
    man = json.loads((out / "manifest.json").read_text())
    picked = man["extra"]["selected_indices"]
    assert len(picked) == 100 and len(set(picked)) == 100
    assert man["extra"]["scores"]["selected"]["n"] == 100


def test_condense_eval_refuses_a_corrupted_artifact(tmp_path):
    r = _run([f"artifact={tmp_path}"], cwd=tmp_path, cmd=CONDENSE_EVAL)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a condense artifact" in lines[0]


@needs_fmnist
def test_multirun_basic_and_joblib(tmp_path):
    for launcher in ("basic", "joblib"):
        sweep = tmp_path / launcher
        r = _run(["-m", f"hydra/launcher={launcher}", "method=random", "ipc=1,2", "budget=smoke", "evaluate=false",
                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = sorted(p.parent.name for p in Path(sweep).rglob("synset.safetensors"))
        assert len(runs) == 2 and "ipc=1" in runs[0] and "ipc=2" in runs[1], runs


@needs_fmnist
def test_record_keeps_the_code_version_taken_at_job_start(tmp_path, monkeypatch):
    """A commit made while a long job runs must not be credited with its result."""
    import condense.provenance as prov
    import condense.synth.runner as runner
    from condense.api import distil

    # the working tree "changes" (a commit lands) as soon as the synthesis starts
    start, later = {"git_sha": "a" * 40, "dirty": False}, {"git_sha": "b" * 40, "dirty": True}
    state = {"now": start}
    real_run = runner.run

    def run_then_commit(*args, **kwargs):
        state["now"] = later
        return real_run(*args, **kwargs)

    monkeypatch.setattr(prov, "code_version", lambda: state["now"])
    monkeypatch.setattr(runner, "run", run_then_commit)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["method=random", "ipc=1", "budget=smoke", "evaluate=false", "device=cpu", "progress=false",
                   f"cache_dir={tmp_path / 'cache'}", f"result_json={tmp_path / 'record.json'}"])
    record = distil(config=cfg, run_dir=tmp_path / "run", command="condense method=random").record
    assert state["now"] == later  # the run did go through the patched runner
    assert record["code_version"] == start
    assert json.loads((tmp_path / "record.json").read_text())["code_version"] == start
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["code_version"] == start
    # the machine's speed probe at both ends of the distillation, and whether bf16 is native
    speed = record["machine"]["gemm_gflops"]
    assert set(speed) == {"start", "end"} and speed["start"] > 0 and speed["end"] > 0
    assert isinstance(record["machine"]["native_bf16"], bool)
    # relative run dir, the data actually read, the preparation time, the precision and its source
    assert record["run_dir"] == "run" and record["command"] == "condense method=random"
    if "CONDENSE_DATA_ROOT" not in os.environ:
        assert record["dataset_root"] == f"<system>/{FMNIST_DIR.name}"  # the Debian package's folder
    assert record["prepare"]["wall_s"] is None or record["prepare"]["wall_s"] >= 0
    assert record["precision"] == {"value": "fp32", "source": "fixed"}
    # the config as run, with its paths written portably (relative to the working directory here)
    assert record["config"] == {**cfg, "cache_dir": "cache", "result_json": "record.json"}
