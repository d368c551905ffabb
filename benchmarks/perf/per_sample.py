"""Per-sample gradient norms: ours (``condense.ops``, backend auto) vs torch.func vmap vs Opacus.

A batch of Fashion-MNIST images (random tensors if the files are not here) through ConvNet-3
(width 128, instance norm; eval mode) and, in the full run, ResNet-18; the norm of every
sample's cross-entropy gradient w.r.t. all weights. Side by side in one process, alternating
(each repeat runs every variant once), the same batch and weights:

- ``ours``: :func:`condense.ops.per_sample_grad_norms` ``backend=auto`` (hooks; per layer ghost
  norm or the chunked per-sample conv norm by the fastDP rule, never all per-sample gradients);
  ``ours_hooks`` / ``ours_ghost``: the other two backends, as extra rows.
- ``vmap``: ``torch.func.vmap(grad(...))`` over ``functional_call`` (every per-sample gradient
  materialized), then the norms.
- ``opacus``: ``GradSampleModule`` (``loss_reduction="sum"``) forward + backward, then the norms
  of ``p.grad_sample``.

Every variant's norms equal vmap's to 1e-4 (relative, per sample). Peak memory: each variant runs
once more in a fresh subprocess and reports ``VmHWM`` minus the RSS it had before the call
(model, batch and runtime already resident). The last two lines are ``ratio vs vmap: X`` and
``ratio vs opacus: Y`` (median time of the baseline / ours; ConvNet-3).

    python benchmarks/perf/per_sample.py --quick --out benchmarks/results/perf/per_sample_quick.json
    python benchmarks/perf/per_sample.py --out benchmarks/results/perf/per_sample.json   # + ResNet-18
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import alternate, load_data, provenance, variant_table, write_record  # noqa: I001

from condense.models import create_model
from condense.ops import per_sample_grad_norms

VARIANTS = ("ours", "ours_hooks", "ours_ghost", "vmap", "opacus")


def build(model_name: str, batch: int, width: int, dataset: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    data, data_name = load_data(dataset)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(data.train_images.shape[0], generator=g)[:batch]
    x, y = data.train_images[idx].clone(), data.train_labels[idx].clone()
    kw = {"width": width, "depth": 3} if model_name == "convnet" else {}
    model = create_model(model_name, data.spec.channels, data.spec.num_classes, data.spec.im_size, generator=g, **kw)
    return model.eval(), x, y, data_name


def norms_fn(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(x, y) -> (B,)`` per-sample gradient norms by variant ``name``."""
    if name.startswith("ours"):
        backend = {"ours": "auto", "ours_hooks": "hooks", "ours_ghost": "ghost"}[name]
        return lambda x, y: per_sample_grad_norms(model, x, y, backend=backend)
    if name == "vmap":
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, {**p, **buffers}, (xi[None],))
            return F.cross_entropy(out, yi[None])

        def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            gs = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
            return torch.stack([g.flatten(1).square().sum(1) for g in gs.values()]).sum(0).sqrt()

        return f
    if name == "opacus":
        import warnings

        from opacus import GradSampleModule

        warnings.filterwarnings("ignore", module="opacus")
        model = copy.deepcopy(model)  # Opacus hooks the modules it wraps: keep them off the others'
        gsm = GradSampleModule(model, loss_reduction="sum")
        gsm.train()  # Opacus records activations in train mode only (no BatchNorm / dropout here: same function)

        def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            gsm.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
            sq = torch.stack([p.grad_sample.flatten(1).square().sum(1) for p in model.parameters()]).sum(0)
            for p in model.parameters():
                p.grad_sample = None
            return sq.sqrt()

        return f
    raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """Subprocess: one call of one variant; prints its peak extra memory (MB) as JSON."""
    torch.manual_seed(0)
    model, x, y, _ = build(args.model, args.batch, args.width, args.dataset)
    f = norms_fn(args.child, model)
    f(x[:2], y[:2])  # lazy initialisation (kernels, hooks) outside the measured call
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _rss_kb("VmHWM")
    f(x, y)
    print(json.dumps({"peak_extra_mb": (_rss_kb("VmHWM") - before) / 1024}))


def peak_mb(args: argparse.Namespace, name: str, model_name: str, batch: int) -> float:
    cmd = [sys.executable, __file__, "--child", name, "--model", model_name, "--batch", str(batch),
           "--width", str(args.width), "--dataset", args.dataset]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"])


def measure(args: argparse.Namespace, model_name: str, batch: int, variants: tuple[str, ...], repeats: int) -> dict:
    model, x, y, data_name = build(model_name, batch, args.width, args.dataset)
    fns = {n: norms_fn(n, model) for n in variants}
    ref = fns["vmap"](x, y)
    check = {}
    for n, f in fns.items():  # also the warm-up
        got = f(x, y)
        check[n] = float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max())
        if check[n] > 1e-4:
            raise SystemExit(f"{model_name}: {n}'s norms differ from vmap's by {check[n]:.2e} (> 1e-4)")
    times, med = alternate({n: (lambda f=f: f(x, y)) for n, f in fns.items()}, repeats)
    mem = {n: peak_mb(args, n, model_name, batch) for n in variants}
    print(f"{model_name} batch {batch}: median s " + ", ".join(f"{n} {t:.3f}" for n, t in med.items()))
    print(f"{model_name} batch {batch}: peak extra MB " + ", ".join(f"{n} {m:.0f}" for n, m in mem.items()))
    return {"model": model_name, "batch": batch, "data": data_name, "median_s": med, "times_s": times,
            "peak_extra_mb": mem, "max_rel_diff_vs_vmap": check,
            "ratio_vs_vmap": med["vmap"] / med["ours"], "ratio_vs_opacus": med["opacus"] / med["ours"],
            "memory_ratio_vs_vmap": mem["ours"] / max(mem["vmap"], 1e-9)}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="ConvNet-3 only, 3 repeats (under 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 5, quick 3)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--resnet-batch", type=int, default=64,
                    help="ResNet-18's batch (vmap and Opacus hold B x 11M per-sample gradients: 64 -> 2.9 GB)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--model", default="convnet", help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="where to write the perf JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child(args)
        return None
    repeats = args.repeats or (3 if args.quick else 5)
    runs = [measure(args, "convnet", args.batch, VARIANTS, repeats)]
    if not args.quick:
        runs.append(measure(args, "resnet18", args.resnet_batch, VARIANTS, repeats))
    head = runs[0]
    result = {
        "schema": 1,
        "kind": "perf",
        "name": f"per_sample_norms_convnet{args.width}_b{args.batch}" + ("_quick" if args.quick else ""),
        "ours_s": head["median_s"]["ours"],
        "baseline_s": head["median_s"]["vmap"],
        "ratio": head["ratio_vs_vmap"],
        "ratio_vs_opacus": head["ratio_vs_opacus"],
        "memory_ratio_vs_vmap": head["memory_ratio_vs_vmap"],
        "baseline": "torch.func vmap(grad) over functional_call, then norms; opacus GradSampleModule as a second baseline",
        "setting": {"threads": torch.get_num_threads(), "repeats": repeats, "width": args.width,
                    "variants": list(VARIANTS), "fp32": True},
        "variants": variant_table({"baseline": head["times_s"]["vmap"],
                                   **{n: t for n, t in head["times_s"].items() if n != "vmap"}}),
        "runs": runs,
        **provenance(),
    }
    write_record(args.out, result)
    print(f"ratio vs vmap: {head['ratio_vs_vmap']:.2f}")
    print(f"ratio vs opacus: {head['ratio_vs_opacus']:.2f}")
    return result


if __name__ == "__main__":
    main()
