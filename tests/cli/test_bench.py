"""condense-bench: suite expansion, skip/resume logic and argv, with a FAKE runner (no distillation)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from condense.cli import bench
from condense.report.records import result_path

# same check as tests/conftest.py (not imported: plain `pytest` does not put the repo root on sys.path)
needs_fmnist = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                                  reason="real Fashion-MNIST not installed")
SUITES = Path(bench.__file__).resolve().parents[2] / "benchmarks" / "suites"


def fake_record(method: str, flip: bool, dataset: str, ipc: int, budget: str, seed: int, tag: str | None = None) -> dict:
    return {"schema": 1, "kind": "ablation" if tag else "accuracy", "tag": tag, "method": method, "flip": flip,
            "dataset": dataset, "ipc": ipc,
            "budget": budget, "seed": seed, "config": {}, "code_version": {"git_sha": None, "dirty": None},
            "machine": {"device": "cpu"}, "distill": {"wall_s": 1.0, "iterations": 2},
            "eval": {"protocol": {"archs": ["convnet"]}, "runs": [],
                     "summary": {"convnet": {"mean": 50.0, "std": 0.0, "n": 1}}},
            "command": "fake"}


class FakeCondense:
    """Stands in for the ``condense -m`` subprocess: writes the records its argv asks for."""

    def __init__(self, fail: set[tuple[str, int]] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or set()

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        kv = dict(a.split("=", 1) for a in argv if "=" in a)
        method, flip = kv["method"], kv.get("method.flip") == "true"
        code = 0
        for ipc in (int(x) for x in kv["ipc"].split(",")):
            if (method, ipc) in self.fail:
                code = 1
                continue
            path = Path(kv["result_json"].strip("'").replace("${ipc}", str(ipc)))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fake_record(method, flip, kv["dataset"], ipc, kv["budget"],
                                                   int(kv["seed"]), kv.get("tag"))))
        return code


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCondense:
    f = FakeCondense()
    monkeypatch.setattr(bench, "run_command", f)
    return f


def test_fmnist_cpu_expansion() -> None:
    suite = bench.load_suite("fmnist_cpu", SUITES)
    runs = bench.expand(suite)
    assert {r.budget for r in runs} == {"cpu"} and {r.seed for r in runs} == {0}
    assert {r.dataset for r in runs} == {"fashion_mnist"}
    got = Counter((r.label, r.ipc) for r in runs)
    assert all(v == 1 for v in got.values())
    for m in ("random", "herding", "kcenter", "dc", "dsa", "dm", "datadam", "mtt", "tesla", "ftd", "datm"):
        assert (m, 1) in got and (m, 10) in got, m
    assert {lab for lab, _ in got if lab.endswith("+flip")} == {"dsa+flip", "dm+flip", "datadam+flip"}
    for m in ("grand", "el2n", "forgetting"):
        assert (m, 10) in got and (m, 50) in got, m
    assert {lab for lab, ipc in got if ipc == 50} == {"random", "herding", "dm", "dsa", "grand", "el2n", "forgetting",
                                                     "dm+multi2", "dsa+multi2"}
    assert {(lab, ipc) for lab, ipc in got if lab.endswith("multi2")} == {(f"{m}+multi2", k) for m in ("dm", "dsa")
                                                                  for k in (1, 10, 50)}
    assert {lab for lab, _ in got if "learned" in lab} == {"dsa+learned", "dsa+multi2+learned"}
    assert len(runs) == 46


def test_multi_formation_entries_pass_the_param_and_keep_their_own_records(tmp_path: Path) -> None:
    suite = bench.load_suite("fmnist_cpu", SUITES)
    run = next(r for r in bench.expand(suite) if r.label == "dm+multi2" and r.ipc == 1)
    assert run.result_path(tmp_path).relative_to(tmp_path).as_posix() == "fashion_mnist/dm+multi2/ipc1-cpu-seed0.json"
    assert run.expect()["variant"] == "multi2"
    (call,) = bench.make_calls([run], results_dir=tmp_path, runs_dir=tmp_path / "runs", suite="s", launcher="basic",
                               group=False, resume=False, passthrough=[])
    assert "param=multi" in call.argv and "param.factor=2" in call.argv


def test_runs_missing_then_skips(tmp_path: Path, fake: FakeCondense, capsys: pytest.CaptureFixture) -> None:
    res = tmp_path / "res"
    args = ["suite=smoke", f"results_dir={res}", f"runs_dir={tmp_path / 'runs'}"]
    assert bench.run(args) == 0
    assert len(fake.calls) == 2
    argv = fake.calls[1]
    assert argv[1] == "-m" and "method=dm" in argv and "ipc=1" in argv and "budget=smoke" in argv
    assert "seed=0" in argv and "resume=true" in argv and not any(a.startswith("hydra/launcher") for a in argv)
    assert (res / "fashion_mnist" / "dm" / "ipc1-smoke-seed0.json").exists()
    assert "summary: 2 done, 0 failed, 0 skipped" in capsys.readouterr().out
    assert bench.run(args) == 0  # everything there: nothing runs
    assert len(fake.calls) == 2
    assert "plan: 0 to run" in capsys.readouterr().out


def test_resume_skips_valid_reruns_corrupt(tmp_path: Path, fake: FakeCondense, capsys) -> None:
    res = tmp_path / "res"
    good = result_path(res, "fashion_mnist", "random", False, 1, "smoke", 0)
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps(fake_record("random", False, "fashion_mnist", 1, "smoke", 0)))
    bad = result_path(res, "fashion_mnist", "dm", False, 1, "smoke", 0)
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": 1, "kind": "accur')  # truncated by a crash
    assert bench.run(["suite=smoke", f"results_dir={res}", f"runs_dir={tmp_path}/runs"]) == 0
    assert [c[c.index("-m") + 1] for c in fake.calls] == ["method=dm"]
    out = capsys.readouterr().out
    assert re.search(r"skip +fashion_mnist +random", out) and re.search(r"rerun +fashion_mnist +dm .*unparsable", out)
    assert json.loads(bad.read_text())["method"] == "dm"


def test_mismatched_record_is_rerun(tmp_path: Path, fake: FakeCondense) -> None:
    res = tmp_path / "res"
    for m in ("random", "dm"):
        p = result_path(res, "fashion_mnist", m, False, 1, "smoke", 0)
        p.parent.mkdir(parents=True)
        rec = fake_record(m, False, "fashion_mnist", 1, "smoke", 0)
        if m == "dm":
            rec["eval"] = None  # evaluation never ran
        p.write_text(json.dumps(rec))
    assert bench.run(["suite=smoke", f"results_dir={res}", f"runs_dir={tmp_path}/runs"]) == 0
    assert len(fake.calls) == 1 and "method=dm" in fake.calls[0]


def test_failure_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    f = FakeCondense(fail={("dm", 1)})
    monkeypatch.setattr(bench, "run_command", f)
    assert bench.run(["suite=smoke", f"results_dir={tmp_path}/res", f"runs_dir={tmp_path}/runs"]) == 1
    out = capsys.readouterr().out
    assert "1 done, 1 failed" in out and "FAILED fashion_mnist  dm" in out


def test_dry_run_and_joblib_grouping(tmp_path: Path, fake: FakeCondense, capsys) -> None:
    suite = tmp_path / "grid.yaml"
    suite.write_text("name: grid\ndataset: fashion_mnist\nbudget: smoke\nseeds: [0, 1]\nentries:\n"
                     "  - {method: dm, ipc: [1, 10], flip: [false, true], overrides: [method.batch_real=16]}\n")
    args = [f"suite={suite}", f"results_dir={tmp_path}/res", f"runs_dir={tmp_path}/runs", "launcher=joblib"]
    assert bench.run([*args, "dry_run=true"]) == 0
    assert fake.calls == []
    assert "plan: 8 to run" in capsys.readouterr().out
    assert bench.run(args) == 0
    assert len(fake.calls) == 4  # (flip x seed), ipcs swept together
    for argv in fake.calls:
        assert "ipc=1,10" in argv and "hydra/launcher=local_parallel" in argv and "method.batch_real=16" in argv
    flips = [a for a in fake.calls if "method.flip=true" in a]
    assert len(flips) == 2 and all("/dm+flip/" in next(x for x in a if x.startswith("result_json=")) for a in flips)
    assert len(list((tmp_path / "res" / "fashion_mnist").rglob("*.json"))) == 8


def test_unknown_suite_and_bad_args(tmp_path: Path, fake: FakeCondense, capsys) -> None:
    assert bench.run(["suite=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown suite 'nope'" in err and "fmnist_cpu" in err and "smoke" in err
    assert bench.run(["suite=smoke", "launcher=mpi"]) == 2
    assert "valid choices: basic, joblib, slurm" in capsys.readouterr().err
    assert bench.run(["suite=smoke", "ipc=5"]) == 2  # grid keys belong to the suite
    assert fake.calls == []


@pytest.mark.parametrize("entry, message", [
    ("{method: random, ipc: [1], flip: [true]}", "has no flip option"),
    ("{method: dmm, ipc: [1]}", "unknown method 'dmm'"),
    ("{method: dm, ipc: [0]}", "positive integers"),
    ("{method: dm, ipc: [1], colour: red}", "unknown key(s) colour"),
    ("{method: dm, ipc: [1], tag: 'a b', overrides: [method.bf16=false]}", "tag must be"),
    ("{method: dm, ipc: [1], tag: fp32}", "needs overrides"),
])
def test_suite_validation(tmp_path: Path, entry: str, message: str) -> None:
    (tmp_path / "bad.yaml").write_text(f"name: bad\ndataset: fashion_mnist\nbudget: cpu\nentries:\n  - {entry}\n")
    with pytest.raises(bench.ConfigError, match=re.escape(message)):
        bench.load_suite("bad", tmp_path)


@pytest.mark.slow
@pytest.mark.integration
@needs_fmnist
def test_real_smoke_suite_and_report(tmp_path: Path) -> None:
    """End to end (~30 s on 2 cores): the real condense CLI runs the smoke suite, then the report."""
    from condense.cli.report import run as report

    res, runs = tmp_path / "res", tmp_path / "runs"
    assert bench.run(["suite=smoke", f"results_dir={res}", f"runs_dir={runs}", "progress=false"]) == 0
    for m in ("random", "dm"):
        rec = json.loads(result_path(res, "fashion_mnist", m, False, 1, "smoke", 0).read_text())
        assert rec["config"]["method"]["name"] == m and rec["code_version"] and rec["machine"]
        assert rec["distill"]["wall_s"] >= 0 and "iterations" in rec["distill"]
        assert rec["eval"]["protocol"]["archs"] == ["convnet"] and rec["eval"]["runs"][0]["test_acc"] > 0
        assert (Path(rec["run_dir"]) / "preview.png").exists()
        # the recorded command is one runnable job: the sweep's interpolated result path resolved
        path = str(result_path(res, "fashion_mnist", m, False, 1, "smoke", 0))
        assert "$" not in rec["command"] and f"result_json={path}" in rec["command"]
        assert rec["distill"]["init_s"] >= 0
    out = tmp_path / "site" / "LEADERBOARD.md"
    # records written from a checkout with uncommitted changes are refused unless allowed
    args = [f"results_dir={res}", f"out={out}", f"html={tmp_path / 'site' / 'lb.html'}"]
    dirty = rec["code_version"]["dirty"]
    assert report(args) == (2 if dirty else 0)
    assert report([*args, "allow_dirty=true"]) == 0
    assert (tmp_path / "site" / "figures" / "preview-fashion_mnist-smoke-dm-ipc1.png").exists()


def test_tagged_ablation_entry(tmp_path: Path, fake: FakeCondense) -> None:
    """A tagged entry has its own result file beside the untagged one, and passes tag= to condense."""
    (tmp_path / "abl.yaml").write_text(
        "name: abl\ndataset: fashion_mnist\nbudget: cpu\nentries:\n  - {method: dm, ipc: [1]}\n"
        "  - {method: dm, ipc: [1], tag: fp32, overrides: [method.bf16=false]}\n")
    res = tmp_path / "res"
    args = ["suite=abl", f"suites_dir={tmp_path}", f"results_dir={res}", f"runs_dir={tmp_path / 'runs'}"]
    assert bench.run(args) == 0
    assert len(fake.calls) == 2 and "tag=fp32" in fake.calls[1] and "method.bf16=false" in fake.calls[1]
    assert "tag=fp32" not in fake.calls[0]
    assert (res / "fashion_mnist" / "dm" / "ipc1-cpu-seed0.json").exists()
    rec = json.loads((res / "fashion_mnist" / "dm" / "ipc1-cpu-fp32-seed0.json").read_text())
    assert (rec["kind"], rec["tag"]) == ("ablation", "fp32")
    assert bench.run(args) == 0 and len(fake.calls) == 2  # both done: resumable as any entry


def test_only_selects_grid_points(tmp_path: Path, fake: FakeCondense, capsys) -> None:
    res = tmp_path / "res"
    base = ["suite=smoke", f"results_dir={res}", f"runs_dir={tmp_path / 'runs'}"]
    assert bench.run([*base, "only=fashion_mnist/dm/*"]) == 0
    assert len(fake.calls) == 1 and "method=dm" in fake.calls[0]
    assert "plan: 1 to run" in capsys.readouterr().out
    assert not (res / "fashion_mnist" / "random").exists()
    assert bench.run([*base, "only=[fashion_mnist/dm/*,*/random/ipc1-*]", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "plan: 1 to run (1 missing, 0 invalid), 1 skipped" in out and re.search(r"run +fashion_mnist +random", out)
    assert bench.run([*base, "only=*/dsa/*"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only='*/dsa/*' matches no grid point" in err
    assert "fashion_mnist/dm/ipc1-smoke-seed0.json" in err
    assert bench.run([*base, "only=[]"]) == 2
    assert "only must be a pattern" in capsys.readouterr().err
    assert len(fake.calls) == 1
