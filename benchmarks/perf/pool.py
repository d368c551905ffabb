"""2x2 average pooling, forward + backward: condense's ``avg_pool2x2`` vs ``F.avg_pool2d(x, 2)``.

The maps a ConvNet-3 pools at batch 256 and width 128: 28x28 and 14x14 (Fashion-MNIST), 32x32
and 16x16 (CIFAR). One timed call = forward, then backward of ``(y * upstream).sum()`` into the
input; the two implementations alternate, the median of the repeats each; the outputs and input
gradients are checked equal first.

    python benchmarks/perf/pool.py --out benchmarks/results/perf/pool.json   # ~20 s
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from _common import alternate, provenance, variant_table, write_record  # noqa: I001  (sibling module of this script)

from condense.models._pool import avg_pool2x2
from condense.runtime import keep_freed_memory


def fwd_bwd(pool: Any, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    xx = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad((pool(xx) * up).sum(), xx)
    return grad


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 14, 32, 16])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    heap_kept = keep_freed_memory()
    gen = torch.Generator().manual_seed(0)
    per_size: dict[str, Any] = {}
    for hw in a.sizes:
        x = torch.randn(a.batch, a.channels, hw, hw, generator=gen)
        up = torch.randn(a.batch, a.channels, hw // 2, hw // 2, generator=gen)
        torch.testing.assert_close(avg_pool2x2(x), F.avg_pool2d(x, 2))
        torch.testing.assert_close(fwd_bwd(avg_pool2x2, x, up), fwd_bwd(lambda t: F.avg_pool2d(t, 2), x, up))
        runs = {"baseline": lambda x=x, up=up: fwd_bwd(lambda t: F.avg_pool2d(t, 2), x, up),
                "ours": lambda x=x, up=up: fwd_bwd(avg_pool2x2, x, up)}
        times, med = alternate(runs, a.repeats)
        per_size[f"{hw}x{hw}"] = {"ours_s": med["ours"], "baseline_s": med["baseline"],
                                  "ratio": med["baseline"] / med["ours"], "variants": variant_table(times)}
        print(f"{a.batch}x{a.channels}x{hw}x{hw}: stock {med['baseline'] * 1e3:.1f} ms, "
              f"ours {med['ours'] * 1e3:.1f} ms, {med['baseline'] / med['ours']:.2f}x")
    first = per_size[f"{a.sizes[0]}x{a.sizes[0]}"]
    rec = {
        "schema": 1, "kind": "perf", "name": "avg_pool2x2_fwd_bwd",
        "ours_s": first["ours_s"], "baseline_s": first["baseline_s"], "ratio": first["ratio"],
        "baseline": "torch.nn.functional.avg_pool2d(x, 2) forward + backward (the stock kernel); "
                    f"top-level figures: the first size ({a.sizes[0]}x{a.sizes[0]})",
        "ours": "condense.models._pool.avg_pool2x2 (row pairs then column pairs; backward widens rows, "
                "then repeats them)",
        "sizes": per_size,
        "setting": {"batch": a.batch, "channels": a.channels, "repeats": a.repeats, "dtype": "float32",
                    "heap_kept": heap_kept},
        **provenance(),
    }
    write_record(a.out, rec)
    return rec


if __name__ == "__main__":
    main()
