"""Wall time of one DM iteration: class-parallel on 2 ranks x 1 thread vs 1 process x 2 threads.

Setting: DM at ipc 10 (``DistributionMatching``, batch_real 256, siamese DSA, fp32 unless
``--bf16``), ConvNet-3 width 128, Fashion-MNIST (random 1x28x28 tensors if its files are not
here). "Ours" is a class-parallel run (``condense.distributed``) of 2 ranks under torchrun, gloo,
one intra-op thread each, each rank owning 5 classes; the baseline is one process with 2 intra-op
threads over all 10 classes. Both run the real loop (``condense.synth.runner.run``, with the ranks'
per-iteration collectives); an iteration's time is the wall time between two iteration ends on
rank 0, after ``--warmup`` iterations. Each repeat launches the baseline and ours once, in
alternating order (drift hits both alike); the record holds every launch's per-iteration median
and the medians over the repeats. Both launches start from the same seed and run the same
iterations; ``same_images`` says whether their final images are byte-identical (a fact, not a
check: 2 intra-op threads may sum in another order than 1, and a rank's smaller batches may take
another kernel, see ``tests/distributed/test_class_parallel.py``). Run it on an otherwise idle
machine: with other work on the cores, the 2-thread process loses most (its threads wait for each
other at every op).

    python benchmarks/perf/distributed_dm.py --out benchmarks/results/perf/distributed_dm.json
    python benchmarks/perf/distributed_dm.py --quick      (tiny random data, seconds: a check that it runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import load_data, provenance, synth_context, variant_table, write_record  # noqa: I001  (sibling module)

from condense.synth.runner import Callback
from condense.types import DatasetSpec, RealData

HERE = Path(__file__).resolve()


def _tiny_data() -> RealData:
    """--quick: 10 classes x 64 random 1x28x28 images."""
    k, per_class = 10, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k * per_class, 1, 28, 28, generator=g)
    y = torch.arange(k).repeat_interleave(per_class)
    spec = DatasetSpec("random", 1, (28, 28), k, tuple(map(str, range(k))), (0.0,), (1.0,))
    return RealData(spec, x, y, x[:10], y[:10])


class _Clock(Callback):
    """Runner callback: the time at the start and at the end of every iteration."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_start(self, syn: Any, start_it: int) -> None:
        self.marks.append(time.perf_counter())

    def on_step(self, it: int, metrics: dict[str, float], syn: Any) -> None:
        self.marks.append(time.perf_counter())
        return None


def worker(args: argparse.Namespace) -> None:
    """One launch (a single process, or one rank under torchrun): run DM, write rank 0's times."""
    from condense.distributed import ClassShard, session
    from condense.runtime import keep_freed_memory
    from condense.synth.distribution_matching import DistributionMatching, DMConfig
    from condense.synth.runner import RunConfig, run  # noqa: I001

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    data, data_name = (_tiny_data(), "random (quick)") if args.quick else load_data(args.dataset)
    with session(torch.device("cpu")) as (world, _):
        ctx = synth_context(data, ipc=args.ipc, width=args.width, seed=0, augment=True)
        if world.parallel:
            ctx = dataclasses.replace(ctx, shard=ClassShard.of(world, data.spec.num_classes))
        synth = DistributionMatching(DMConfig(batch_real=args.batch_real, bf16=args.bf16), ctx)
        clock = _Clock()
        result = run(synth, RunConfig(iterations=args.warmup + args.iterations, progress=False, callbacks=[clock]))
        steps = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)][args.warmup:]
        if world.is_main:
            images = result.syn.images.detach().contiguous().numpy().tobytes()
            Path(args.worker_out).write_text(json.dumps({
                "ranks": world.size, "threads": torch.get_num_threads(), "data": data_name, "times_s": steps,
                "median_s": statistics.median(steps), "images_sha256": hashlib.sha256(images).hexdigest()}))


def _launch(kind: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One launch of the baseline (``1x2``) or ours (``2x1``); its rank-0 record."""
    common = ["--worker", "--worker-out", str(out), "--ipc", str(args.ipc), "--width", str(args.width),
              "--batch-real", str(args.batch_real), "--iterations", str(args.iterations), "--warmup",
              str(args.warmup), "--dataset", args.dataset, *(["--bf16"] if args.bf16 else []),
              *(["--quick"] if args.quick else [])]
    if kind == "1x2":
        cmd = [sys.executable, str(HERE), "--threads", "2", *common]
        threads = "2"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HERE),
               "--threads", "1", *common]
        threads = "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CONDENSE_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} launch failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny random data, width 16, batch_real 32, 1 repeat of 3 iterations: checks that it runs")
    ap.add_argument("--repeats", type=int, default=None, help="launches of each side (default 5, quick 1)")
    ap.add_argument("--iterations", type=int, default=None, help="timed iterations per launch (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations per launch (default 2, quick 1)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=None, help="default 256 (quick 32)")
    ap.add_argument("--width", type=int, default=None, help="default 128 (quick 16)")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default fp32)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the perf JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.iterations = args.iterations or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.batch_real = args.batch_real or (32 if args.quick else 256)
    args.width = args.width or (16 if args.quick else 128)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        worker(args)
        return None
    repeats = args.repeats or (1 if args.quick else 5)
    launches: dict[str, list[dict[str, Any]]] = {"1x2": [], "2x1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for kind in (("1x2", "2x1") if r % 2 == 0 else ("2x1", "1x2")):
                rec = _launch(kind, args, Path(tmp) / f"{kind}-{r}.json")
                launches[kind].append(rec)
                print(f"repeat {r}: {kind} median {rec['median_s']:.3f} s/iteration")
    times = {"baseline": [x["median_s"] for x in launches["1x2"]],
             "ranks2_threads1": [x["median_s"] for x in launches["2x1"]]}
    base_s, ours_s = statistics.median(times["baseline"]), statistics.median(times["ranks2_threads1"])
    same = len({x["images_sha256"] for runs in launches.values() for x in runs}) == 1
    print(f"DM ipc {args.ipc} iteration: 2 ranks x 1 thread {ours_s:.3f} s, 1 process x 2 threads {base_s:.3f} s "
          f"(ratio {base_s / ours_s:.2f}x); final images identical: {same}")
    data_name = launches["1x2"][0]["data"]
    result = {
        "schema": 1,
        "kind": "perf",
        "name": f"dm_class_parallel_2x1_vs_1x2_convnet{args.width}_ipc{args.ipc}_br{args.batch_real}"
                + ("_quick" if args.quick else ""),
        "ours_s": ours_s,
        "baseline_s": base_s,
        "ratio": base_s / ours_s,
        "baseline": "one process with 2 intra-op threads over all classes (same DM config, seed and loop)",
        "ours": "class-parallel: torchrun, 2 ranks (gloo) x 1 intra-op thread, contiguous class blocks",
        "setting": {"model": f"convnet width {args.width}", "data": data_name, "ipc": args.ipc,
                    "batch_real": args.batch_real, "dsa": True, "precision": "bf16" if args.bf16 else "fp32",
                    "repeats": repeats, "iterations_per_launch": args.iterations, "warmup": args.warmup,
                    "time": "median over the timed iterations of rank 0 (iteration end to iteration end), "
                            "then median over the launches"},
        "times_s": times,
        "variants": variant_table(times),
        "launches": launches,
        "same_images": same,
        **provenance(),
    }
    write_record(args.out, result)
    return result


if __name__ == "__main__":
    main()
