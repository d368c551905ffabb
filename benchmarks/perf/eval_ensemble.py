"""Throughput of evaluation training: K models trained together (torch.func vmap) vs one by one.

    python benchmarks/perf/eval_ensemble.py --quick            # < 1 min
    python benchmarks/perf/eval_ensemble.py --out benchmarks/results/perf/eval_ensemble.json

Ours and the baseline run alternately in one process on the same data (Fashion-MNIST-shaped,
ConvNet-3, batch 256, DSA on); medians of the repeats. Also reports the bf16-autocast ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import provenance, variant_table, write_record  # noqa: I001  (sibling module of this script)

from condense.augment import DSA
from condense.models import create_model
from condense.runtime import keep_freed_memory
from condense.train import FitConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (< 1 minute)")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--images", type=int, default=256, help="training set size (ipc 10 = 100)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-keep-heap", action="store_true", help="leave glibc's default mmap/trim behaviour")
    a = ap.parse_args()
    heap_kept = False if a.no_keep_heap else keep_freed_memory()
    epochs = a.epochs or (2 if a.quick else 8)
    repeats = a.repeats or (2 if a.quick else 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.images, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (a.images,), generator=g)
    dsa = DSA()

    def make(gen: torch.Generator) -> torch.nn.Module:
        return create_model("convnet", 1, 10, (28, 28), generator=gen)

    def timed(vectorize: bool, bf16: bool = False) -> float:
        cfg = FitConfig(epochs=epochs, batch_size=256, bf16=bf16)
        t = time.perf_counter()
        fit(make, (x, y), cfg, seeds=list(range(a.models)), augment=dsa, vectorize=vectorize)
        return time.perf_counter() - t

    timed(True)  # warm-up
    ours, base, ours_bf16 = [], [], []
    for _ in range(repeats):
        base.append(timed(False))
        ours.append(timed(True))
        ours_bf16.append(timed(True, bf16=True))
    o, b, ob = statistics.median(ours), statistics.median(base), statistics.median(ours_bf16)
    rec = {
        "schema": 1, "kind": "perf", "name": "eval_ensemble",
        "ours_s": round(o, 4), "baseline_s": round(b, 4), "ratio": round(b / o, 3),
        "baseline": f"the same {a.models} ConvNet-3 models trained one after the other (plain nn.Module)",
        "ours": f"{a.models} models stacked and trained as one torch.func vmap model",
        "bf16": {"ours_s": round(ob, 4), "ratio_vs_fp32_vectorized": round(o / ob, 3)},
        "variants": variant_table({"baseline": base, "ours": ours, "ours_bf16": ours_bf16}),
        "setup": {"models": a.models, "images": a.images, "epochs": epochs, "repeats": repeats,
                  "batch": 256, "dsa": True, "heap_kept": heap_kept, "input": "1x28x28", "arch": "convnet (width 128, depth 3)"},
        **provenance(),
    }
    print(f"sequential {b:.2f} s  vectorized {o:.2f} s  ratio {b / o:.2f}x  (bf16 vectorized {ob:.2f} s, "
          f"{o / ob:.2f}x faster than fp32)")
    write_record(a.out, rec)


if __name__ == "__main__":
    main()
