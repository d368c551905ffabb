"""Same config + seed -> byte-identical synset; SIGKILL after a checkpoint + resume == uninterrupted."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

from tests.cli.test_cli import CONDENSE, _env, _run
from tests.conftest import needs_fmnist

ARGS = ["method=dm", "ipc=2", "budget=smoke", "budget.max_seconds=null", "evaluate=false", "progress=false",
        "+model.kwargs.width=32"]


@needs_fmnist
def test_same_seed_gives_byte_identical_synset(tmp_path):
    outs = []
    for name in ("a", "b"):
        r = _run([*ARGS, "iterations=3", f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append((tmp_path / name / "synset.safetensors").read_bytes())
    assert outs[0] == outs[1]
    r = _run([*ARGS, "iterations=3", "seed=1", f"hydra.run.dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert (tmp_path / "c" / "synset.safetensors").read_bytes() != outs[0]


@needs_fmnist
@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    n = 30
    full = _run([*ARGS, f"iterations={n}", "budget.ckpt_every=2", f"hydra.run.dir={tmp_path / 'full'}"],
                cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = tmp_path / "killed"
    p = subprocess.Popen(CONDENSE + [*ARGS, f"iterations={n}", "budget.ckpt_every=2", f"hydra.run.dir={run_dir}"],
                         cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["iteration"] >= 4:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    done = torch.load(ckpt, weights_only=True)["iteration"]
    assert 4 <= done < n, done
    assert not (run_dir / "synset.safetensors").exists()
    r = _run([*ARGS, f"iterations={n}", "budget.ckpt_every=2", "resume=true", f"hydra.run.dir={run_dir}"],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "synset.safetensors").read_bytes() == (tmp_path / "full" / "synset.safetensors").read_bytes()
