"""A process training experts is SIGKILLed right after an epoch checkpoint; the rerun resumes from it
and writes the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from condense.teachers import _training, get_experts
    from tests.conftest import make_tiny_data

    cache, kill_after = sys.argv[1], int(sys.argv[2])
    real_save = _training.save_checkpoint

    def save_then_die(path, payload):
        real_save(path, payload)
        if payload["fit"]["epoch"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    _training.save_checkpoint = save_then_die
    data = make_tiny_data(num_classes=4, per_class=16, test_per_class=6)
    es = get_experts(data, 2, 3, model_kwargs={"width": 8, "depth": 2}, cache_dir=cache, seed=0)
    print([str(e.path) for e in es])
""")


def _train(cache: Path, kill_after: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(kill_after)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_after_an_epoch_checkpoint_resumes_to_the_same_bytes(tmp_path):
    whole = _train(tmp_path / "whole", kill_after=-1)
    assert whole.returncode == 0, whole.stderr
    killed = _train(tmp_path / "killed", kill_after=2)  # dies after expert 0's epoch-2 checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (root,) = (tmp_path / "killed" / "experts").iterdir()
    assert (root / ".work-seed0" / "checkpoint.pt").exists() and not (root / "seed0").exists()
    resumed = _train(tmp_path / "killed", kill_after=-1)
    assert resumed.returncode == 0, resumed.stderr
    (ref_root,) = (tmp_path / "whole" / "experts").iterdir()
    assert root.name == ref_root.name  # same key
    for seed in (0, 1):
        a, b = ref_root / f"seed{seed}", root / f"seed{seed}"
        assert (a / "trajectory.safetensors").read_bytes() == (b / "trajectory.safetensors").read_bytes()
        ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
        assert (ma["test_acc"], ma["loss"], ma["files"]) == (mb["test_acc"], mb["loss"], mb["files"])
    assert not list(root.glob(".work-*")) and not list(root.glob(".tmp-*"))
