"""Class-parallel distillation on the CPU with gloo, 2 processes (``condense.distributed``).

- the partition, and what a class-parallel run refuses (BatchNorm networks, methods without it);
- DSA's inner loop split over 2 ranks (gradients all-reduced) trains the network of one process,
  up to the order of float sums;
- ``dm`` under ``torchrun`` (the README command) writes the bytes of a one-process run;
- ``dsa``: the same images up to float rounding (measured below);
- a rank killed mid-run stops the other with one clear line; the rerun with ``resume=true``
  ends with the bytes of an uninterrupted run.

Why ``dm`` is byte-identical here and ``dsa`` is not: a rank computes exactly the one-process
numbers for its classes as long as every layer takes the same kernel for the rank's batch as for
the whole batch; DSA's inner loop sums the ranks' gradient shares (another summation order).
At these sizes (width 8, ipc 2, 32 real images per class) every layer of ConvNet-3 does; other
sizes can cross a batch-size threshold of a kernel (condense's fast 2x2 pool takes the stock
kernel below 65536 input elements; a one-image convolution takes another oneDNN path) and then
differ in the last bits (measured: ``dm`` with ``flip=true`` at these sizes, 4.8e-7 after 4
iterations).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condense.distributed import ClassShard, World, partition
from condense.errors import ConfigError
from tests.distributed._helpers import (
    BIN,
    CONDENSE,
    env,
    fabricate_fashion_mnist,
    finish,
    free_port,
    inner_loop_state,
    inner_loop_worker,
    start_ranks,
)

ITERATIONS = 12  # smoke: a checkpoint every 2 iterations
#: The largest difference allowed between a 2-rank and a 1-process ``dsa`` run (measured: 2.4e-7
#: after 4 iterations of ipc 2 with 2 outer x 2 inner loops; the images are O(1)).
DSA_ATOL = 1e-5


def _args(root: Path, run_dir: Path, method: str = "dm", iterations: int = ITERATIONS, *extra: str) -> list[str]:
    return [f"method={method}", "dataset=fashion_mnist", f"dataset.root={root}", "ipc=2", "budget=smoke",
            "budget.max_seconds=null", f"iterations={iterations}", "precision=fp32", "evaluate=false",
            "progress=false", "+model.kwargs.width=8", f"cache_dir={root.parent / 'cache'}",
            f"hydra.run.dir={run_dir}", *extra]


def _one_process(args: list[str], cwd: Path) -> None:
    r = subprocess.run([*CONDENSE, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _ok(results: list[tuple[int, str, str]]) -> None:
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} exited {rc}: {err[-3000:]}"


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    return fabricate_fashion_mnist(tmp_path_factory.mktemp("data") / "fm")


@pytest.fixture(scope="module")
def dm_single(fm) -> bytes:
    """The one-process ``dm`` run every class-parallel one is compared with."""
    out = fm.parent / "single"
    _one_process(_args(fm, out), fm.parent)
    return (out / "synset.safetensors").read_bytes()


# ----------------------------------------------------------------------------- no processes


def test_partition_is_contiguous_balanced_and_refuses_idle_ranks():
    assert partition(10, 2) == [(0, 5), (5, 10)]
    assert partition(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert partition(3, 3) == [(0, 1), (1, 2), (2, 3)]
    for k, w in ((10, 4), (7, 7), (100, 8)):
        blocks = partition(k, w)
        assert blocks[0][0] == 0 and blocks[-1][1] == k
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        assert max(h - lo for lo, h in blocks) - min(h - lo for lo, h in blocks) <= 1
    with pytest.raises(ConfigError, match="3 ranks but only 2 classes"):
        partition(2, 3)
    s = ClassShard.of(World(rank=1, size=3), 10)
    assert (s.lo, s.hi, s.classes, s.rows(2)) == (4, 7, 3, slice(8, 14))
    assert s.labels(2, "cpu").tolist() == [4, 4, 5, 5, 6, 6]


def test_batchnorm_networks_and_other_methods_are_refused(tiny_data):
    import dataclasses

    from condense.synth.base import SYNTHESIZERS
    from condense.synth.distribution_matching import DistributionMatching, DMConfig
    from condense.synth.runner import RunConfig, run
    from tests.conftest import make_ctx

    shard = ClassShard.of(World(rank=0, size=2), tiny_data.spec.num_classes)
    bn = dataclasses.replace(make_ctx(tiny_data), shard=shard, model_name="convnet_bn")
    with pytest.raises(ConfigError, match="without BatchNorm"):
        DistributionMatching(DMConfig(iterations=1), bn)
    random_cls = SYNTHESIZERS.get("random")
    synth = random_cls(random_cls.Config(), dataclasses.replace(make_ctx(tiny_data), shard=shard))
    with pytest.raises(ConfigError, match="random does not run class-parallel.*datadam, dc, dm, dsa"):
        run(synth, RunConfig(progress=False))


def test_a_one_process_resume_refuses_rank_checkpoints(tmp_path, tiny_data):
    from condense.synth.distribution_matching import DistributionMatching, DMConfig
    from condense.synth.runner import RunConfig, rank_checkpoint_name, run
    from tests.conftest import make_ctx

    (tmp_path / rank_checkpoint_name(1, 2, 4)).write_bytes(b"")
    synth = DistributionMatching(DMConfig(iterations=1, batch_real=4), make_ctx(tiny_data))
    with pytest.raises(ConfigError, match="class-parallel run of 2 ranks; resume it with torchrun --nproc-per-node 2"):
        run(synth, RunConfig(run_dir=tmp_path, resume=True, progress=False))


def test_the_tasks_of_a_submitit_slurm_job_are_the_ranks():
    """``hydra/launcher=slurm hydra.launcher.tasks_per_node=2``: each task reads SLURM's variables."""
    import os

    from condense.distributed import env_world

    # env_world() exports torchrun's variables into os.environ itself (submitit's helper): restore
    # the whole environment afterwards, or later in-process runs of this session would wait for a
    # second rank (monkeypatch alone would restore what it saw, e.g. RANK=1, on teardown)
    saved = dict(os.environ)
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        assert env_world() == World()
        os.environ.update({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
                           "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
                           "SLURM_JOB_NUM_NODES": "1"})
        assert env_world() == World(rank=1, size=2, local_rank=1)
        assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
        os.environ["SLURM_NTASKS"] = "1"
        for key in ("RANK", "WORLD_SIZE"):
            del os.environ[key]
        assert env_world() == World()  # one task: a plain run
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "RANK" not in os.environ or os.environ.get("RANK") == saved.get("RANK")


# ----------------------------------------------------------------------------- 2 gloo processes


@pytest.mark.parametrize("flip", [False, True])
def test_the_inner_loop_split_over_two_ranks_trains_the_one_process_network(tmp_path, flip):
    """Every rank draws the shuffles and DSA parameters of the whole set (the generators end in
    the one-process state) and the gradient shares sum to the one-process gradient."""
    torch.multiprocessing.spawn(inner_loop_worker, args=(2, free_port(), str(tmp_path), flip), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = inner_loop_state(None, flip)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ranks[0]["rng"], single["rng"]) and torch.equal(ranks[1]["rng"], single["rng"])
    for name, w in single["model"].items():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name  # the ranks agree exactly
        assert torch.allclose(ranks[0]["model"][name], w, rtol=0, atol=1e-6), (name, (ranks[0]["model"][name] - w).abs().max())


def test_torchrun_dm_writes_the_one_process_bytes(fm, dm_single, tmp_path):
    """The README's command (``torchrun --standalone --nproc-per-node 2 --no-python condense``)."""
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
           str(BIN / "condense"), *_args(fm, out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "synset.safetensors").read_bytes() == dm_single
    assert r.stdout.count("distilled fashion_mnist with dm") == 1  # rank 0 reports, rank 1 is quiet
    import json

    record = json.loads((out / "result.json").read_text())
    assert record["distill"]["ranks"] == 2 and record["command"].startswith("torchrun --standalone --nproc-per-node 2 --no-python condense ")
    written = sorted(p.name for p in out.iterdir())
    ckpts = [n for n in written if n.startswith("checkpoint.")]
    assert ckpts == [f"checkpoint.rank{r}-of-2.it{i}.pt" for r in (0, 1) for i in (ITERATIONS - 2, ITERATIONS)]
    assert sorted(set(written) - set(ckpts)) == ["manifest.json", "metrics.jsonl", "preview.png", "result.json",
                                                 "synset.safetensors"]


def test_dsa_on_two_ranks_matches_one_process_up_to_rounding(fm, tmp_path):
    extra = ("method.outer_loop=2", "method.inner_loop=2")  # ipc 2 has no published loops; the inner loop runs
    _one_process(_args(fm, tmp_path / "one", "dsa", 4, *extra), tmp_path)
    _ok(finish(start_ranks(_args(fm, tmp_path / "two", "dsa", 4, *extra), tmp_path), timeout=300))
    one = load_file(tmp_path / "one" / "synset.safetensors")
    two = load_file(tmp_path / "two" / "synset.safetensors")
    assert torch.equal(one["labels"], two["labels"])
    diff = float((one["images"] - two["images"]).abs().max())
    print(f"dsa, 2 ranks vs 1 process: max |difference| {diff:.3g} (images up to {float(one['images'].abs().max()):.3g})")
    assert diff <= DSA_ATOL


def test_a_killed_rank_stops_the_job_and_resume_gives_the_uninterrupted_bytes(fm, dm_single, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(fm, run_dir)
    procs = start_ranks(args, tmp_path)
    t0 = time.time()
    while not list(run_dir.glob("checkpoint.rank1-of-2.it*.pt")):  # after rank 1's first checkpoint
        assert time.time() - t0 < 240 and procs[1].poll() is None, "rank 1 wrote no checkpoint"
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGSTOP)  # frozen at once: rank 0 cannot finish without it
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    (rc0, _, err0), (rc1, _, _) = finish(procs, timeout=120)
    assert rc1 == -signal.SIGKILL
    assert rc0 == 1 and time.time() - t_kill < 60
    line = err0.strip().splitlines()[-1]
    assert line.startswith("condense: error: class-parallel run: rank 0 of 2 lost the other ranks during "), line
    assert "resume=true" in line
    assert not (run_dir / "synset.safetensors").exists()
    _ok(finish(start_ranks([*args, "resume=true"], tmp_path), timeout=300))
    assert (run_dir / "synset.safetensors").read_bytes() == dm_single
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == ITERATIONS  # rank 0's log, truncated to the resumed checkpoint and continued


#: Largest difference allowed between a 2-rank and a 1-process ``sre2l`` run: the group's BatchNorm
#: statistics come from summed sums and sums of squares (E[x^2] - E[x]^2) on 2 ranks, from
#: ``x.var`` in one process (measured: 1.3e-5 after 4 iterations of ipc 2 with crops and flips;
#: the images are O(1)).
RECOVERY_ATOL = 1e-4


@pytest.mark.parametrize("method", ["rded", "sre2l"])
def test_torchrun_recovery_matches_one_process(fm, tmp_path, method):
    """Recovery runs class-parallel: every rank draws the crops of the whole group, the BatchNorm
    statistics are summed over the ranks; rded selects per class (the same bytes)."""
    teacher = ["method.teacher.epochs=1", "method.teacher.train_size=100", "method.teacher.test_size=100",
               "+method.teacher.model_kwargs.width=8", "method.teacher.bf16=false"]
    extra = [*teacher, "method.candidates_per_class=10"] if method == "rded" else \
        [*teacher, "method.crop=true", "method.flip=true", "method.curriculum=cosine"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(_args(fm, single, method, 4, *extra), tmp_path)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
           str(BIN / "condense"), *_args(fm, multi, method, 4, *extra)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(single / "synset.safetensors")
    b = load_file(multi / "synset.safetensors")
    assert torch.equal(a["labels"], b["labels"])
    if method == "rded":
        assert torch.equal(a["images"], b["images"])
    else:
        diff = (a["images"] - b["images"]).abs().max().item()
        print(f"sre2l 2 ranks vs 1 process: max |diff| {diff:.3g}")
        assert diff <= RECOVERY_ATOL, diff
