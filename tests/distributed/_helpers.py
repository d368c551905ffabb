"""Launch class-parallel runs on the CPU (gloo) for the tests: fabricated Fashion-MNIST files,
a free port, N ranks of the ``condense`` CLI with torchrun's environment variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.fabricated import fabricate_fashion_mnist  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONDENSE = [sys.executable, "-c", "from condense.cli.main import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    """The environment of a test run: offline, one thread per process, no torchrun variables."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    out.update({"CONDENSE_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO)}, **extra)
    return out


def start_ranks(args: Sequence[str], cwd: Path, world: int = 2, timeout_s: float = 300.0,
                **popen: object) -> list[subprocess.Popen]:
    """``world`` processes of the CLI with torchrun's variables set by hand (no agent, so a test
    can stop one rank and watch what the others do)."""
    port = str(free_port())
    procs = []
    for r in range(world):
        e = env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, CONDENSE_DIST_TIMEOUT=str(timeout_s))
        procs.append(subprocess.Popen([*CONDENSE, *args], cwd=cwd, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120.0) -> list[tuple[int, str, str]]:
    """Wait for every process; ``(returncode, stdout, stderr)`` in rank order."""
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so, se))
    return out


# ----------------------------------------------------------------------------- in-process ranks

def inner_loop_worker(rank: int, world: int, port: int, out: str, flip: bool) -> None:
    """One rank of :func:`inner_loop_state`: a class-parallel DSA synthesizer trains a network
    on the synthetic set (its inner loop); the trained weights go to ``out/rank<r>.pt``."""
    import datetime

    import torch
    import torch.distributed as dist

    from condense.distributed import ClassShard, World

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        shard = ClassShard.of(World(rank=rank, size=world), 4)
        torch.save(inner_loop_state(shard, flip), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def inner_loop_state(shard: object, flip: bool) -> dict:
    """DSA's inner loop (3 epochs, micro-batches of 3) on tiny data: the network's weights after
    it, and the generator's state (one process: ``shard=None``)."""
    import dataclasses

    import torch

    from condense.synth.gradient_matching import DSAConfig, DSAGradientMatching
    from tests.conftest import make_ctx, make_tiny_data

    ctx = dataclasses.replace(make_ctx(make_tiny_data(), ipc=3), shard=shard)
    synth = DSAGradientMatching(DSAConfig(iterations=1, outer_loop=2, inner_loop=3, batch_real=4, flip=flip,
                                          micro_batch=3, batch_train=5), ctx)
    syn = synth.init_set()
    model = ctx.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    synth.train_network(model, opt, syn)
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "rng": ctx.generator.get_state()}
