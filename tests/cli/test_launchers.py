"""Hydra launchers for independent jobs (distillation runs, teachers, experts): the SLURM configs
compose and produce a valid sbatch script (no cluster here: a stub ``srun`` on the PATH and the
submission stopped before ``sbatch``); a local joblib sweep gives every job its own directory."""

from __future__ import annotations

import os
import subprocess

import pytest
from omegaconf import OmegaConf

from condense.cli.main import CONF_DIR
from tests.distributed._helpers import CONDENSE, env, fabricate_fashion_mnist


def _hydra_config(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("config_name", ["config", "teachers"])
@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_slurm_launcher_configs_compose_and_build_their_sbatch_script(tmp_path, monkeypatch, config_name, launcher):
    """``hydra/launcher=submitit_slurm`` (the plugin's stock config) and ``slurm`` (condense's
    preset on it) run the plugin's own ``launch`` up to the submission: every parameter is one
    submitit accepts, and the sbatch script says what was asked for."""
    import submitit
    from hydra.utils import instantiate

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 1\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    cfg = _hydra_config(config_name, [f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu",
                                      "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=90",
                                      f"hydra.sweep.dir={sweep}"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    captured = {}

    def no_submission(self, fn, *iterables):  # what sbatch would get
        captured["executor"], captured["jobs"] = self, list(zip(*iterables, strict=True))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", no_submission)
    launcher_obj = instantiate(cfg.hydra.launcher)
    launcher_obj.config = cfg
    jobs = [["ipc=1"], ["ipc=10"]] if config_name == "config" else [["expert=0"], ["expert=1"]]
    assert launcher_obj.launch(jobs, initial_job_idx=0) == []
    assert [j[0] for j in captured["jobs"]] == jobs and [j[2] for j in captured["jobs"]] == [0, 1]
    script = captured["executor"]._executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=90",
                 "export SUBMITIT_EXECUTOR=slurm"):
        assert line in script, script
    assert str(sweep / ".submitit") in script  # submitit's logs: per job id (%j) and task (%t)
    preset = OmegaConf.load(CONF_DIR / "hydra" / "launcher" / "slurm.yaml")
    if launcher == "slurm":
        assert f"#SBATCH --cpus-per-task={preset.cpus_per_task}" in script


def test_a_local_joblib_sweep_gives_every_job_its_own_directory(tmp_path):
    """Even two jobs with the same overrides (``seed=0,0``) write into different folders."""
    fm = fabricate_fashion_mnist(tmp_path / "fm", per_class=6, test_per_class=2)
    sweep = tmp_path / "sweep"
    r = subprocess.run([*CONDENSE, "-m", "hydra/launcher=local_parallel", "method=random", "ipc=1",
                        "seed=0,0", "budget=smoke", "evaluate=false", "progress=false", f"dataset.root={fm}",
                        f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    dirs = sorted(str(p.parent.relative_to(sweep)) for p in sweep.rglob("synset.safetensors"))
    assert dirs == [f"job{i}_budget=smoke,evaluate=False,ipc=1,method=random,progress=False,seed=0" for i in (0, 1)], dirs
    assert (sweep / dirs[0] / "synset.safetensors").read_bytes() == (sweep / dirs[1] / "synset.safetensors").read_bytes()
    # sweeps started in the same second do not share a folder either (microseconds in its name)
    assert "%S-%f}" in (CONF_DIR / "config.yaml").read_text() and "%S-%f}" in (CONF_DIR / "teachers.yaml").read_text()
