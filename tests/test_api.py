"""condense.distil / condense.evaluate: the README's example runs as written; overrides compose like
the CLI's; bad input is one ConfigError line with nothing written; only condense/cli knows Hydra."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import condense
from condense.api import compose, default_run_dir
from condense.artifacts import load_synset
from condense.errors import ConfigError
from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first ``python`` code block of README.md's "Python API" section."""
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md's Python API section has no python code block"
    return m.group(1)


@needs_fmnist
@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONDENSE_CACHE", str(tmp_path / "cache"))
    ns: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), ns)
    result, report = ns["result"], ns["report"]
    run_dir = tmp_path / "runs" / "api-example"
    assert result.run_dir.resolve() == run_dir
    for role in ("synset", "manifest", "preview", "eval", "result"):
        assert result.paths[role].is_file(), role
    syn = load_synset(result.run_dir)
    assert syn.images.shape == (10, 1, 28, 28) and syn.meta.method == "dm"
    record = json.loads((run_dir / "result.json").read_text())
    assert record == result.record
    assert record["run_dir"] == "runs/api-example"  # relative to the working directory
    assert record["command"] == "condense method=dm dataset=fashion_mnist ipc=1 budget=smoke"
    assert record["distill"]["iterations"] == 2 and record["eval"]["summary"]["convnet"]["n"] == 1
    assert record["precision"]["source"] == "default"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["precision"] == record["precision"]
    # evaluate() re-trained a fresh model on the artifact: same protocol, same seed -> same number
    assert report.summary["convnet"] == record["eval"]["summary"]["convnet"]
    assert json.loads((run_dir / "eval.json").read_text())["summary"] == report.summary


def test_keywords_compose_like_the_command_line():
    """The CLI line the API derives (kept as the record's command) composes to the same config."""
    from condense.cli.build import compose as compose_cli

    kw = {"seed": 3, "evaluate": False, "precision": "fp32", "max_seconds": 1.5, "tag": "v.1",
          "export": ["tensors"], "cache_dir": "/tmp/a dir/it's", "model": "convnet_bn", "eval": "cross_arch",
          "method__batch_real": 16, "model.kwargs.width": 16, "eval.epochs": 7}
    cfg, cli = compose("dm", "fashion_mnist", 2, "smoke", **kw)
    assert cli[:4] == ["method=dm", "dataset=fashion_mnist", "ipc=2", "budget=smoke"]
    assert "+model.kwargs.width=16" in cli and "method.batch_real=16" in cli
    assert compose_cli(cli) == cfg
    assert (cfg["seed"], cfg["method"]["batch_real"], cfg["model"]["name"], cfg["model"]["kwargs"]) == (
        3, 16, "convnet_bn", {"width": 16})
    assert cfg["eval"]["archs"][0] == "convnet" and len(cfg["eval"]["archs"]) > 1 and cfg["eval"]["epochs"] == 7
    assert default_run_dir(cfg) == Path("runs/fashion_mnist/dm/ipc2-smoke-seed3")
    # a mapping onto a node merges key by key (and is written so on the command line)
    merged, cli = compose("dc", model={"kwargs": {"width": 8, "depth": 2}}, eval={"epochs": 3, "lr": 0.5})
    assert cli == ["method=dc", "+model.kwargs.width=8", "+model.kwargs.depth=2", "eval.epochs=3", "eval.lr=0.5"]
    assert compose_cli(cli) == merged and merged["model"]["name"] == "convnet" and merged["eval"]["momentum"] == 0.9
    # a ready dict: overrides apply to a copy, groups cannot be renamed without composing
    cfg2, _ = compose(config=cfg, seed=4)
    assert cfg2["seed"] == 4 and cfg["seed"] == 3
    with pytest.raises(ConfigError, match="groups cannot be chosen by name"):
        compose(config=cfg, method="dc")


@pytest.mark.parametrize("kwargs, needle", [
    ({"method": "nosuch"}, "unknown method 'nosuch'; valid choices: cda, committee, datadam, datm, dc, dm"),
    ({"budget": "huge"}, "unknown budget 'huge'; valid choices: "),
    ({"nosuchkey": 1}, "unknown config key 'nosuchkey'; valid top-level keys: "),
    ({"method": "dm", "method__bogus": 1}, "unknown key(s) 'bogus' in method; valid keys: "),
    ({"ipc": 6001}, "ipc 6001 exceeds the smallest class of fashion_mnist (6000 training images)"),
    ({"export": ["zip"]}, "unknown export 'zip'; valid choices: imagefolder, tensors"),
    ({"method": "dm", "method__bf16": "auto"}, "method.bf16 must be true, false or null"),
    ({"precision": "fp16"}, "precision must be one of fp32, bf16 or null"),
])
def test_bad_input_is_one_config_error_line_and_nothing_written(tmp_path, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        condense.distil(run_dir=tmp_path / "run", **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names.add(n.module.split(".")[0])
    return names


def test_only_the_cli_imports_hydra():
    outside = [p for p in (REPO / "condense").rglob("*.py") if "cli" not in p.relative_to(REPO / "condense").parts]
    assert len(outside) > 20
    offenders = [str(p.relative_to(REPO)) for p in outside if _imports(p) & {"hydra", "omegaconf"}]
    assert not offenders, offenders
    # and running the pipeline on a ready config loads neither
    code = ("import sys, condense.api, condense.config, condense.artifacts, condense.eval; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
