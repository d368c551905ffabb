"""The configs ship in the wheel: built and installed into a bare folder, ``condense`` runs from
outside the repository on its packaged ``conf/`` (not the checkout's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parents[2]


def _package_dirs() -> set[str]:
    """Every folder under condense/ holding Python modules, as a dotted package name."""
    found = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in (REPO / "condense").rglob("*.py")
             if "__pycache__" not in p.parts}
    return found


def test_the_package_list_names_every_package_folder_and_maps_conf():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    assert listed - {"condense.conf"} == _package_dirs(), "pyproject.toml [tool.setuptools] packages is stale"
    assert tool["package-dir"] == {"condense.conf": "conf"}
    assert {"*.yaml", "**/*.yaml"} <= set(tool["package-data"]["condense.conf"])


def _copy_source(dest: Path) -> None:
    """What a build reads (no build/ or egg-info left in the shared checkout)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("condense", "conf"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)


@needs_fmnist
@pytest.mark.slow
def test_the_wheel_ships_every_config_and_runs_outside_the_repo(tmp_path):
    src, dist, site, elsewhere = (tmp_path / d for d in ("src", "dist", "site", "elsewhere"))
    for d in (src, dist, elsewhere):
        d.mkdir()
    _copy_source(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(dist)], cwd=src,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("condense-*.whl")
    r = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # every yaml of every group folder is installed, at the same place under condense/conf
    want = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    have = sorted(p.relative_to(site / "condense" / "conf").as_posix()
                  for p in (site / "condense" / "conf").rglob("*.yaml"))
    assert have == want
    out = elsewhere / "run"
    argv = ["condense", "method=random", "ipc=1", "budget=smoke", f"hydra.run.dir={out}",
            f"cache_dir={tmp_path / 'cache'}"]
    code = (f"import sys; sys.argv = {argv!r}; import condense; from condense.cli.main import CONF_DIR, main; "
            f"print('imported', condense.__file__, CONF_DIR, flush=True); main()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), CONDENSE_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    imported = r.stdout.splitlines()[0].split()
    assert imported[1] == str(site / "condense" / "__init__.py")  # the wheel's, not the checkout's
    assert imported[2] == str(site / "condense" / "conf")
    for f in ("synset.safetensors", "manifest.json", "eval.json", "result.json"):
        assert (out / f).is_file(), f
