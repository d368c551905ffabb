"""Time one DM iteration: condense's batched step vs a straightforward per-class loop.

Setting: ConvNet-3 (width 128), Fashion-MNIST (random 1x28x28 tensors if the files are not on
this machine), ipc 10, batch_real 256, siamese DSA on. "Ours" is ``DistributionMatching.step``
(one forward of all K*B real views under no_grad, one of all synthetic views, class means by
reshape). The baseline, written here, is the reference repo's structure: for each class, augment
its real and synthetic batch with the same parameters, forward each, mean, squared distance;
then one backward and one SGD step. Both draw the same network, real batch and DSA parameters
from a generator in the same state, so their losses must agree (checked). Ours, the baseline and
ours with bf16 autocast (and with ``compile=true``: fp32, bf16, and fp32 without the fused first
block, ``fuse_stem=false``) are timed alternately in one process; medians of the repeats. Both sides run with ``condense.runtime.keep_freed_memory`` as the
CLI does (``--no-keep-heap``: neither).

    python benchmarks/perf/distribution_matching.py --quick --out benchmarks/results/perf/dm_quick.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (  # noqa: I001  (sibling module of this script)
    alternate,
    check_same_draw,
    load_data,
    provenance,
    stock_pooling,
    synth_context,
    timed,
    variant_table,
    write_record,
)

from condense.runtime import keep_freed_memory
from condense.synth.base import SynthContext
from condense.synth.distribution_matching import AttentionMatching, DistributionMatching
from condense.types import RealData

REPO = Path(__file__).resolve().parents[2]


def make_ctx(data: RealData, args: argparse.Namespace, seed: int) -> SynthContext:
    return synth_context(data, ipc=args.ipc, width=args.width, seed=seed, augment=True)


class PerClassLoop:
    """The baseline: the reference's per-class loop, drawing exactly what ``step`` draws."""

    def __init__(self, ctx: SynthContext, cfg: DistributionMatching.Config, images: torch.Tensor) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.images = images.detach().clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=float(cfg.lr_img), momentum=cfg.momentum)

    def step(self) -> float:
        ctx, cfg = self.ctx, self.cfg
        k, ipc = ctx.spec.num_classes, ctx.ipc
        model = stock_pooling(ctx.make_model().requires_grad_(False).train())  # same draw order as ours
        real = ctx.index.gather(ctx.data.train_images, cfg.batch_real, ctx.generator)
        # siamese_views' draw: one transform per class, shared by its real and synthetic images
        params = ctx.augment.sample_per_group(k, 1, ctx.generator)
        loss = self.images.new_zeros(())
        for c in range(k):
            p = params.group(c)
            img_real = ctx.augment.apply(real[c], p)
            img_syn = ctx.augment.apply(self.images[c * ipc : (c + 1) * ipc], p)
            out_real = model.embed(img_real).detach()
            out_syn = model.embed(img_syn)
            loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.item())



def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats (about a minute on 2 idle cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 7, quick 3)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--no-datadam", action="store_true", help="skip the DataDAM step timing")
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the compile=true and compile=true+bf16 variants (their first step compiles, ~15-30 s; "
             "--quick skips them too)",
    )
    ap.add_argument(
        "--no-keep-heap",
        action="store_true",
        help="do not apply condense.runtime.keep_freed_memory (the CLI applies it; without it both "
             "sides pay page faults on big tensors, the batched forward most)",
    )
    ap.add_argument("--out", type=Path, default=None, help="where to write the perf JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    heap_kept = False if args.no_keep_heap else keep_freed_memory()
    args.compile = not (args.no_compile or args.quick)
    repeats = args.repeats or (3 if args.quick else 7)

    data, data_name = load_data(args.dataset)
    cfg = DistributionMatching.Config(batch_real=args.batch_real)
    variants = {
        "ours": DistributionMatching(cfg, make_ctx(data, args, 0)),
        "ours_bf16": DistributionMatching(
            DistributionMatching.Config(batch_real=args.batch_real, bf16=True), make_ctx(data, args, 0)
        ),
    }
    if args.compile:
        for name, extra in (
            ("ours_compile", {}),
            ("ours_compile_bf16", {"bf16": True}),
            ("ours_compile_stock_stem", {"fuse_stem": False}),
        ):
            variants[name] = DistributionMatching(
                DistributionMatching.Config(batch_real=args.batch_real, compile=True, **extra),
                make_ctx(data, args, 0),
            )
    sets = {name: s.init_set() for name, s in variants.items()}
    base = PerClassLoop(make_ctx(data, args, 0), variants["ours"].cfg, sets["ours"].images)

    # -- same draw, same loss (also the warm-up of every variant) ------------------------------
    check, rel, rel_bf16 = check_same_draw(base, variants, sets, lambda s, syn: s.step(syn, 0)["loss"])

    # -- alternate the variants, medians -------------------------------------------------------
    runs: dict[str, Callable[[], object]] = {"baseline": base.step}
    for name, synth in variants.items():
        runs[name] = lambda synth=synth, syn=sets[name]: synth.step(syn, 1)
    times, med = alternate(runs, repeats)
    print("median s/iteration: " + ", ".join(f"{n} {t:.3f}" for n, t in med.items()))

    datadam = None
    if not args.no_datadam:
        dd = AttentionMatching(AttentionMatching.Config(), make_ctx(data, args, 1))
        dd_syn = dd.init_set()
        dd.step(dd_syn, 0)
        dd_times = [timed(lambda: dd.step(dd_syn, 1)) for _ in range(2 if args.quick else repeats)]
        datadam = {"batch_real": dd.cfg.batch_real, "median_s": statistics.median(dd_times), "times_s": dd_times}
        print(f"datadam (batch_real {dd.cfg.batch_real}) median s/iteration {datadam['median_s']:.3f}")

    ratio = med["baseline"] / med["ours"]
    for name in med:
        if name != "baseline":
            print(f"{name}: {med['baseline'] / med[name]:.2f}x vs loop, "
                  f"{med['ours'] / med[name]:.2f}x vs fp32 ours")
    result = {
        "schema": 1,
        "kind": "perf",
        "name": f"dm_iteration_convnet{args.width}_ipc{args.ipc}_br{args.batch_real}",
        "ours_s": med["ours"],
        "baseline_s": med["baseline"],
        "ratio": ratio,
        "baseline": (
            "per-class loop as in the reference main_DM.py: for each class augment real_c and "
            "syn_c with the same DSA parameters, embed each, squared distance of the means; "
            "same network, real batch and DSA draw as ours; fp32"
        ),
        "setting": {
            "model": f"convnet width {args.width}",
            "data": data_name,
            "ipc": args.ipc,
            "batch_real": args.batch_real,
            "dsa": True,
            "repeats": repeats,
            "allocator": "glibc heap kept (mallopt)" if heap_kept else "default",
        },
        "times_s": times,
        "variants": variant_table(times),
        "loss_check": {"ours": check["ours"], "baseline": check["baseline"], "rel_diff": rel},
        "bf16": {
            "ours_s": med["ours_bf16"],
            "ratio_vs_baseline": med["baseline"] / med["ours_bf16"],
            "ratio_vs_fp32_ours": med["ours"] / med["ours_bf16"],
            "loss": check["ours_bf16"],
            "loss_rel_diff_vs_fp32": rel_bf16,
        },
        "compile": None
        if not args.compile
        else {
            name: {
                "ours_s": med[name],
                "ratio_vs_baseline": med["baseline"] / med[name],
                "ratio_vs_fp32_ours": med["ours"] / med[name],
                "loss_rel_diff_vs_fp32": abs(check[name] - check["ours"]) / abs(check["ours"]),
            }
            for name in ("ours_compile", "ours_compile_bf16", "ours_compile_stock_stem")
        },
        "datadam": datadam,
        **provenance(),
    }
    write_record(args.out, result)
    if args.out is None:
        print(json.dumps(copy.deepcopy(result), indent=2))
    return result


if __name__ == "__main__":
    main()
