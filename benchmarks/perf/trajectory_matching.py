"""Time one MTT iteration: condense's student vs a re-implementation of the reference loop.

Setting: ConvNet-3 (width 128), ipc 10 (100 synthetic images, batch_syn = all of them),
syn_steps 20, DSA on every student batch, Fashion-MNIST images (random 1x28x28 tensors if the
files are not here). Start and target parameters: a fresh ConvNet-3 and the same plus small
noise (the iteration's cost does not depend on where an expert is).

"Ours" is :func:`condense.synth.trajectory.full_unroll` (``functional_call`` over the flat
parameter vector), its backward and the image / step-size SGD updates, as ``mtt``'s ``step``
runs them. The baseline, written here, is the reference repo's loop (``distill.py`` of
GeorgeCazenavette/mtt-distillation): a hand-flattened student that slices one flat vector into
conv / norm / linear weights, per step ``torch.autograd.grad(ce, params[-1], create_graph=True)``
and a list of every step's parameters; then the normalised distance, backward and the SGD steps.
Both use the same batches and the same DSA draws, so their losses must agree (checked to 1e-5).
Variants (ours): fp32; bf16 autocast; channels-last batches; both; TESLA (constant memory).
Timed alternately in one process, medians of the repeats. ``torch.compile`` is not a variant: it
cannot trace the double backward (``create_graph``) the unroll needs.

    python benchmarks/perf/trajectory_matching.py --quick --out benchmarks/results/perf/mtt_iteration_quick.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import alternate, load_data, provenance, variant_table, write_record  # noqa: I001

from condense.augment import DSA, default_strategy
from condense.models import create_model
from condense.synth.trajectory import Student, Unroll, full_unroll, tesla_unroll

REPO = Path(__file__).resolve().parents[2]


class ReferenceStudent:
    """The reference's ``ReparamModule`` idea for ConvNet-3 written out: one flat vector, sliced
    by hand into each layer's weights (conv -> instance norm -> ReLU -> avg-pool, x depth; linear)."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], width: int, depth: int) -> None:
        self.shapes, self.width, self.depth = shapes, width, depth

    def __call__(self, x: torch.Tensor, flat_param: torch.Tensor) -> torch.Tensor:
        views, offset = [], 0
        for _, shape in self.shapes:
            n = math.prod(shape)
            views.append(flat_param[offset:offset + n].view(shape))
            offset += n
        h, i = x, 0
        for d in range(self.depth):
            h = F.conv2d(h, views[i], views[i + 1], padding=3 if d == 0 else 1)
            h = F.group_norm(h, self.width, views[i + 2], views[i + 3])
            h = F.avg_pool2d(F.relu(h), 2)
            i += 4
        return F.linear(h.flatten(1), views[i], views[i + 1])


def reference_iteration(net: ReferenceStudent, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
                        target: torch.Tensor, syn_lr: torch.Tensor, batches: list[torch.Tensor],
                        augment: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The reference loop: returns the loss (its graph reaches ``images`` and ``syn_lr``)."""
    student_params = [start.clone().requires_grad_(True)]
    for step, these in enumerate(batches):
        x = augment(step, images[these])
        out = net(x, flat_param=student_params[-1])
        ce = F.cross_entropy(out, labels[these])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / start.numel()
    param_dist = F.mse_loss(start, target, reduction="sum") / start.numel()
    return param_loss / param_dist


class Side:
    """One side of the comparison: images, step size and their optimizers (MTT's settings)."""

    def __init__(self, images: torch.Tensor, lr0: float) -> None:
        self.images = images.detach().clone().requires_grad_(True)
        self.lr = torch.tensor(lr0, requires_grad=True)
        self.opt = torch.optim.SGD([self.images], lr=100.0, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.lr], lr=1e-5, momentum=0.5)

    def update(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            loss.backward()
        self.opt.step()
        self.opt_lr.step()
        self.opt.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, variants ours and ours_bf16 only")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations per variant (default 5, quick 2)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--syn-steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--out", type=Path, default=None, help="where to write the perf JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    repeats = args.repeats or (1 if args.quick else 3)

    data, data_name = load_data(args.dataset)
    spec = data.spec
    g = torch.Generator().manual_seed(0)
    k = spec.num_classes
    idx = torch.cat([torch.nonzero(data.train_labels == c).squeeze(1)[: args.ipc] for c in range(k)])
    images, labels = data.train_images[idx].clone(), data.train_labels[idx].clone()
    model = create_model("convnet", spec.channels, k, spec.im_size, generator=g, width=args.width, depth=3)
    model.requires_grad_(False)
    layout = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    ours_student = Student(model, layout)
    ref_net = ReferenceStudent(layout, args.width, 3)
    dsa = DSA(default_strategy(spec.name) if spec.name != "random" else DSA().strategy)

    def draws(seed: int) -> tuple[list[torch.Tensor], Callable[[int, torch.Tensor], torch.Tensor]]:
        gd = torch.Generator().manual_seed(seed)
        batches = [torch.randperm(images.shape[0], generator=gd) for _ in range(args.syn_steps)]
        seeds = torch.randint(0, 2**62, (args.syn_steps,), generator=gd).tolist()

        def aug(i: int, x: torch.Tensor) -> torch.Tensor:
            return dsa(x, torch.Generator().manual_seed(int(seeds[i])))

        return batches, aug

    names = ["baseline", "ours", "ours_bf16", "ours_channels_last", "ours_bf16_channels_last", "tesla"]
    if args.quick:
        names = names[:3]
    sides = {name: Side(images, 0.01) for name in names}

    def run(name: str, seed: int) -> float:
        s = sides[name]
        batches, aug = draws(seed)
        if name == "baseline":
            loss = reference_iteration(ref_net, s.images, labels, start, target, s.lr, batches, aug)
            s.update(loss)
            return float(loss.detach())
        u = Unroll(s.images, labels, batches, aug, bf16="bf16" in name, channels_last="channels_last" in name)
        if name == "tesla":
            loss = tesla_unroll(ours_student, start, {args.syn_steps: target}, s.lr, u, [s.images])
            s.update(None)
            return float(loss)
        loss = full_unroll(ours_student, start, {args.syn_steps: target}, s.lr, u)
        s.update(loss)
        return float(loss.detach())

    # same draws, same loss (also the warm-up): every side starts from the same images
    check = {name: run(name, 1) for name in sides}
    rel = abs(check["ours"] - check["baseline"]) / abs(check["baseline"])
    print("losses (same draws): " + ", ".join(f"{n} {v:.6f}" for n, v in check.items()) + f"; rel diff {rel:.2e}")
    if rel > 1e-5:
        raise SystemExit(f"ours and the reference loop disagree: rel diff {rel:.3e} > 1e-5")

    counter = {"it": 2}

    def timed_run(name: str) -> Callable[[], object]:
        def call() -> object:
            counter["it"] += 1
            return run(name, 1000 + counter["it"])
        return call

    times, med = alternate({name: timed_run(name) for name in sides}, repeats)
    print("median s/iteration: " + ", ".join(f"{n} {t:.3f}" for n, t in med.items()))
    for name in med:
        if name not in ("baseline", "ours"):
            print(f"{name}: {med['baseline'] / med[name]:.2f}x vs reference loop")
    ratio = med["baseline"] / med["ours"]
    result = {
        "schema": 1,
        "kind": "perf",
        "name": f"mtt_iteration_convnet{args.width}_ipc{args.ipc}_steps{args.syn_steps}",
        "ours_s": med["ours"],
        "baseline_s": med["baseline"],
        "ratio": ratio,
        "baseline": ("reference loop of mtt-distillation distill.py: hand-flattened ConvNet-3 student, per-step "
                     "autograd.grad(create_graph=True), list of step parameters; same batches and DSA draws; fp32"),
        "setting": {"model": f"convnet width {args.width}", "data": data_name, "ipc": args.ipc,
                    "syn_steps": args.syn_steps, "batch_syn": int(images.shape[0]), "dsa": True, "repeats": repeats},
        "times_s": times,
        "variants": variant_table(times),
        "loss_check": {**check, "rel_diff": rel},
        **provenance(),
    }
    write_record(args.out, result)
    if args.out is None:
        print(json.dumps({k: v for k, v in result.items() if k not in ("times_s", "variants")}, indent=2))
    print(f"ratio vs reference loop: {ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
