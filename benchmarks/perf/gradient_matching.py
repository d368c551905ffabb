"""Time one DC matching step: condense's implementation vs a straightforward per-class loop.

Setting: ConvNet-3 (width 128), Fashion-MNIST (random 1x28x28 tensors if the files are not on
this machine), ipc 10, batch_real 256, no augmentation (DC). One timed call = one outer-loop
matching step on a fresh network: draw the real batch of every class, per-class gradients of
the real batch (no graph) and of the synthetic images (with graph), the ``ours`` distance summed
over classes, one SGD step on the images.

- ours: ``GradientMatching.match_step`` (``condense.ops.per_class_grads`` with ``impl=auto``,
  i.e. ``loop`` on CPU; 1-D weights skipped as ``ours`` ignores them; image gradient only).
- baseline (written here): the reference ``main.py`` structure — for each class, forward the real
  batch, ``torch.autograd.grad``, forward the synthetic images, ``autograd.grad(create_graph=True)``,
  the reference's layer-wise distance over all weights; then ``loss.backward()`` and a step; on
  the network of the reference repositories, stock torch layers (``nn.AvgPool2d``).
- loop_fastpool: the same loop on condense's ConvNet, whose 2x2 average pool is
  ``condense.models._pool.AvgPool2x2`` (same function, faster kernel): separates what the
  pooling kernel gives from what the reorganisation of the step gives.
- ours_bf16: ours under bfloat16 autocast. ours_vmap (not with ``--quick``): ``impl=vmap``.
- ours_compile / ours_compile_bf16: ``compile=true`` (the real-batch forward + loss through
  ``torch.compile``, the ConvNet's first block of the real side as the fused pass of
  ``condense.ops.stem`` on a CPU; compiled during the untimed same-draw check).
  ours_compile_stock_stem: the same without the fused block (``fuse_stem=false``).

Both sides run with ``condense.runtime.keep_freed_memory`` (as the CLI does; ``--no-keep-heap``
turns it off for both): without it a CPU step is dominated by page faults on big tensors, which
flatters micro-batching and penalises the 256-image baseline.

``--quick`` uses the first 4 classes: the per-class work is the published one, so the ratio is
that of the 10-class step, which takes 2.5x as long.

Both draw the same network and real batch from a generator in the same state, so their losses
must agree (checked). Variants are timed alternately in one process; medians of the repeats.
Also reported (``flop_rate``): the step's FLOPs (PyTorch's counter), every variant's GFLOP/s and
this CPU's throughput on the step's dominant convolution, i.e. how compute-bound the baseline
already is and so the best ratio any reorganisation of the same arithmetic could reach here.
Also reported (``time_split``): one profiled step of the baseline and of the fastest variant,
the share of each inside convolution kernels, and the ratio the fastest one would reach if
everything but its convolutions took no time (``conv_only_ratio_bound``).
Also reported: one inner-loop epoch at this ipc (network SGD on the synthetic set, DSA on), the
other cost of an outer iteration at ipc >= 10.

    python benchmarks/perf/gradient_matching.py --quick --out benchmarks/results/perf/gm_quick.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (  # noqa: I001  (sibling module of this script)
    alternate,
    check_same_draw,
    conv_peak_gflops,
    counted_flops,
    first_classes,
    flop_rates,
    load_data,
    provenance,
    stock_pooling,
    synth_context,
    time_split,
    timed,
    variant_table,
    write_record,
)

from condense.ops import matching_params
from condense.runtime import keep_freed_memory
from condense.synth.base import SynthContext
from condense.synth.gradient_matching import DSAGradientMatching, GradientMatching
from condense.types import RealData, SyntheticSet

REPO = Path(__file__).resolve().parents[2]


def make_ctx(data: RealData, args: argparse.Namespace, seed: int, augment: bool = False) -> SynthContext:
    return synth_context(data, ipc=args.ipc, width=args.width, seed=seed, augment=augment)


def reference_distance(gr: list[torch.Tensor], gs: list[torch.Tensor]) -> torch.Tensor:
    """The reference's ``match_loss`` with ``ours``: per weight, per output row, 1 - cosine."""
    dis = gs[0].new_zeros(())
    for a, b in zip(gr, gs, strict=True):
        if a.dim() == 1:
            continue  # biases / norm weights: 0 in the reference
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        dis = dis + (1 - (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1) + 1e-6)).sum()
    return dis


class PerClassLoop:
    """The baseline: the reference's per-class loop, drawing what ``match_step`` draws."""

    def __init__(self, ctx: SynthContext, batch_real: int, images: torch.Tensor, lr: float,
                 stock: bool = True) -> None:
        self.ctx, self.batch_real, self.stock = ctx, batch_real, stock
        self.images = images.detach().clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=lr, momentum=0.5)

    def step(self) -> float:
        ctx = self.ctx
        k, ipc = ctx.spec.num_classes, ctx.ipc
        net = ctx.make_model().train()
        if self.stock:
            stock_pooling(net)
        plist = list(net.parameters())
        real = ctx.index.gather(ctx.data.train_images, self.batch_real, ctx.generator)
        loss = self.images.new_zeros(())
        for c in range(k):
            lab_real = torch.full((real.shape[1],), c, dtype=torch.long)
            gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real[c]), lab_real), plist)]
            img_syn = self.images[c * ipc : (c + 1) * ipc]
            lab_syn = torch.full((ipc,), c, dtype=torch.long)
            gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), plist, create_graph=True)
            loss = loss + reference_distance(gw_real, gw_syn)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.item())


def ours_step(synth: GradientMatching, syn: SyntheticSet) -> float:
    model = synth.ctx.make_model().train()
    return float(synth.match_step(model, matching_params(model, synth.cfg.dis_metric), syn))




def best_variant(medians: dict[str, float]) -> str:
    """The fastest variant of ours (fp32 or bf16, compiled or not) by median step time."""
    return min((n for n in medians if n not in ("baseline", "loop_fastpool")), key=medians.__getitem__)


def inner_epoch_time(data: RealData, args: argparse.Namespace, repeats: int) -> float:
    """Median seconds of one inner epoch (DSA on) on the ipc-sized synthetic set."""
    synth = DSAGradientMatching(
        DSAGradientMatching.Config(outer_loop=2, inner_loop=1), make_ctx(data, args, 5, augment=True)
    )
    syn = synth.init_set()
    model = synth.ctx.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    synth.train_network(model, opt, syn)  # warm-up
    return statistics.median(timed(lambda: synth.train_network(model, opt, syn)) for _ in range(repeats))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="4 classes, 2 repeats, no vmap variant (under a minute on 2 idle cores)")
    ap.add_argument("--classes", type=int, default=None,
                    help="use the first N classes (default all; quick 4): same per-class work")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5, quick 2)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--no-vmap", action="store_true", help="skip the impl=vmap variant")
    ap.add_argument("--no-keep-heap", action="store_true",
                    help="do not apply condense.runtime.keep_freed_memory (the CLI applies it; "
                         "without it both sides pay page faults on big tensors)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compile=true variants (the first step compiles, ~10-30 s)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the perf JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    heap_kept = False if args.no_keep_heap else keep_freed_memory()
    repeats = args.repeats or (2 if args.quick else 5)
    batch_real = args.batch_real
    with_vmap = not (args.quick or args.no_vmap)

    data, data_name = load_data(args.dataset)
    data = first_classes(data, args.classes or (4 if args.quick else data.spec.num_classes))
    base_cfg = {"batch_real": batch_real, "outer_loop": 1, "inner_loop": 0}
    variants = {
        "ours": GradientMatching(GradientMatching.Config(**base_cfg), make_ctx(data, args, 0)),
        "ours_bf16": GradientMatching(GradientMatching.Config(**base_cfg, bf16=True), make_ctx(data, args, 0)),
    }
    if not args.no_compile:
        for tag, extra in (("ours_compile", {}), ("ours_compile_bf16", {"bf16": True}),
                           ("ours_compile_stock_stem", {"fuse_stem": False})):
            variants[tag] = GradientMatching(GradientMatching.Config(**base_cfg, compile=True, **extra),
                                             make_ctx(data, args, 0))
    if with_vmap:  # 2 classes per vectorised call bounds memory (~1.5 GB at batch_real 256)
        variants["ours_vmap"] = GradientMatching(
            GradientMatching.Config(**base_cfg, grad_impl="vmap", chunk_classes=2), make_ctx(data, args, 0)
        )
    sets = {name: s.init_set() for name, s in variants.items()}
    base = PerClassLoop(make_ctx(data, args, 0), batch_real, sets["ours"].images, 0.1)
    # the same loop on condense's ConvNet (its fast pooling): what the reorganisation alone gives
    loop_fast = PerClassLoop(make_ctx(data, args, 0), batch_real, sets["ours"].images, 0.1, stock=False)

    # -- same draw, same loss (also the warm-up of every variant) ------------------------------
    check, rel, rel_bf16 = check_same_draw(base, variants, sets, ours_step)

    # -- alternate the variants, medians -------------------------------------------------------
    loop_fast.step()  # warm-up (not part of the same-draw check: same network, same loss)
    runs: dict[str, Callable[[], object]] = {"baseline": base.step, "loop_fastpool": loop_fast.step}
    for name, synth in variants.items():
        runs[name] = lambda synth=synth, syn=sets[name]: ours_step(synth, syn)
    times, med = alternate(runs, repeats)
    print("median s/matching step: " + ", ".join(f"{n} {t:.3f}" for n, t in med.items()))
    # -- how close to the machine: the step's arithmetic against this CPU's conv throughput -----
    flops = counted_flops(base.step)
    rates = flop_rates(flops, med, conv_peak_gflops())
    print(f"{flops / 1e9:.1f} GFLOP per step; GFLOP/s: "
          + ", ".join(f"{n} {r:.0f}" for n, r in rates["gflops"].items())
          + f"; conv peak fp32 {rates['conv_peak_gflops']['fp32']:.0f}, bf16 {rates['conv_peak_gflops']['bf16']:.0f}"
          + f" -> bound on the ratio: fp32 {rates['fp32_ratio_bound']:.2f}x, bf16 {rates['bf16_ratio_bound']:.2f}x")
    # -- where the time goes: the share inside convolution kernels (one profiled step each) -----
    best = best_variant(med)
    split = {name: time_split(runs[name]) for name in ("baseline", best)}
    conv_bound = med["baseline"] / (med[best] * split[best]["conv_share"]) if split[best]["conv_share"] else None
    print("convolution share of a profiled step: " + ", ".join(
        f"{n} {v['conv_share']:.0%} ({v['conv_s']:.2f} of {v['profiled_s']:.2f} s)" for n, v in split.items())
        + (f" -> {best} with everything but its convolutions free: {conv_bound:.2f}x" if conv_bound else ""))
    inner = inner_epoch_time(data, args, repeats)
    print(f"one inner epoch (ipc {args.ipc}, DSA): {inner:.3f} s")

    ratio = med["baseline"] / med["ours"]
    ratios = {name: med["baseline"] / t for name, t in med.items() if name != "baseline"}
    print("ratio baseline/variant: " + ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()))
    result: dict[str, Any] = {
        "schema": 1,
        "kind": "perf",
        "name": "gradient_matching_dc_match_step",
        "ours_s": med["ours"],
        "baseline_s": med["baseline"],
        "ratio": ratio,
        "baseline": (
            "reference main.py structure written in this script: per class, forward + "
            "autograd.grad on the real batch, forward + autograd.grad(create_graph) on the "
            "synthetic images, layer-wise distance over all weights, then loss.backward() and "
            "an SGD step; one call = one matching step on a fresh ConvNet-3 built from stock "
            "torch layers (nn.AvgPool2d; loop_fastpool: the same loop on condense's ConvNet)"
        ),
        "variants": variant_table(times),
        "baseline_times_s": times["baseline"],
        "inner_epoch_s": inner,
        "flop_rate": rates,
        "time_split": {"steps": split, "fastest_variant": best, "conv_only_ratio_bound": conv_bound},
        "setting": {"dataset": data_name, "model": "convnet", "width": args.width, "ipc": args.ipc,
                    "batch_real": batch_real, "classes": data.spec.num_classes, "repeats": repeats,
                    "dis_metric": "ours", "heap_kept": heap_kept, "quick": args.quick},
        "loss_check": {"ours": check["ours"], "baseline": check["baseline"], "rel_diff": rel,
                       "bf16_rel_diff": rel_bf16},
        **provenance(),
    }
    write_record(args.out, result)
    return result


if __name__ == "__main__":
    main()
