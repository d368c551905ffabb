"""Memory of one trajectory-matching iteration vs syn_steps: MTT's full unroll and TESLA.

For syn_steps in 10 / 20 / 40 / 80, one iteration (unroll, matching loss, image and step-size
gradients) of ``full_unroll`` (MTT) and of ``tesla_unroll`` (TESLA) on ConvNet-3 (width 128),
Fashion-MNIST images (random tensors if the files are not here), ipc 1 (10 images, all of them
in every student batch; ``--ipc`` changes it), DSA on. Measured:

- bytes held by autograd: every tensor saved for backward is counted from the moment it is
  saved until its graph is freed (``torch.autograd.graph.saved_tensors_hooks``; storages counted
  once); the peak over the iteration. Deterministic.
- peak RSS of a fresh subprocess running just that iteration on the saved synthetic set (the
  dataset never enters it; ``VmHWM``), as a cross-check: it also holds the runtime and what
  autograd does not, e.g. TESLA's stored per-step parameters (P floats each).
- TESLA's image gradient against the full unroll's (cosine), the approximation it makes.

The last line: ``tesla memory ratio 80/10 steps: X`` (autograd bytes; MTT's ratio printed too).

    python benchmarks/perf/trajectory_memory.py --out benchmarks/results/perf/trajectory_memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import load_data, provenance, write_record  # noqa: I001

from condense.augment import DSA, default_strategy
from condense.models import create_model
from condense.synth.trajectory import Student, Unroll, full_unroll, tesla_unroll

STEPS = (10, 20, 40, 80)


class SavedBytes:
    """Peak bytes of the tensors autograd holds for backward (each storage counted once)."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [count, bytes]
        self.now = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]

    def pack(self, t: torch.Tensor) -> object:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live:
            self.live[key][0] += 1
        else:
            self.live[key] = [1, st.nbytes()]
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
        return _Held(t, key, self)

    @staticmethod
    def unpack(h: object) -> torch.Tensor:
        return h.tensor  # type: ignore[attr-defined]

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("counter", "key", "tensor")

    def __init__(self, tensor: torch.Tensor, key: int, counter: SavedBytes) -> None:
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self) -> None:
        self.counter._release(self.key)


def synthetic_set(ipc: int, dataset: str) -> dict:
    """The first ``ipc`` training images of every class (what the student trains on)."""
    data, name = load_data(dataset)
    k = data.spec.num_classes
    idx = torch.cat([torch.nonzero(data.train_labels == c).squeeze(1)[:ipc] for c in range(k)])
    return {"images": data.train_images[idx].clone(), "labels": data.train_labels[idx].clone(), "name": name,
            "spec": data.spec}


def problem(syn: dict, steps: int, width: int):  # noqa: ANN201
    spec, name = syn["spec"], syn["name"]
    g = torch.Generator().manual_seed(0)
    k = spec.num_classes
    images = syn["images"].clone().requires_grad_(True)
    labels = syn["labels"].clone()
    model = create_model("convnet", spec.channels, k, spec.im_size, generator=g, width=width, depth=3)
    model.requires_grad_(False)
    student = Student(model, [(n, tuple(p.shape)) for n, p in model.named_parameters()])
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    dsa = DSA(default_strategy(spec.name) if name != "random" else DSA().strategy)
    seeds = torch.randint(0, 2**62, (steps,), generator=g).tolist()
    batches = [torch.randperm(images.shape[0], generator=g) for _ in range(steps)]

    def aug(i: int, x: torch.Tensor) -> torch.Tensor:
        return dsa(x, torch.Generator().manual_seed(int(seeds[i])))

    lr = torch.tensor(0.01, requires_grad=True)
    return student, start, target, lr, Unroll(images, labels, batches, aug), name


def iteration(method: str, syn: dict, steps: int, width: int) -> dict:
    """One iteration of ``method``; autograd's peak bytes and the image gradient."""
    student, start, target, lr, u, name = problem(syn, steps, width)
    counter = SavedBytes()
    with counter.hooks():
        if method == "mtt":
            full_unroll(student, start, {steps: target}, lr, u).backward()
        else:
            tesla_unroll(student, start, {steps: target}, lr, u, [u.images])
    return {"autograd_peak_bytes": counter.peak, "grad": u.images.grad.detach().clone(), "data": name,
            "num_params": int(start.numel())}


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``,
    which a child started by fork + exec inherits from its parent); ``ru_maxrss`` where there is
    no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> None:
    """Subprocess mode: run one iteration on the set saved by the parent (so the dataset never
    enters this process), print its peak RSS (bytes) and autograd peak as JSON."""
    syn = torch.load(args.set_file, weights_only=False)
    before = peak_rss()
    out = iteration(args.child, syn, args.steps_one, args.width)
    rss = peak_rss()
    print(json.dumps({"rss_peak_bytes": rss, "rss_before_bytes": before,
                      "autograd_peak_bytes": out["autograd_peak_bytes"]}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS cross-check")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=["mtt", "tesla"], help=argparse.SUPPRESS)
    ap.add_argument("--steps-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--set-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child(args)
        return {}
    syn = synthetic_set(args.ipc, args.dataset)
    tmp = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    tmp.close()
    torch.save(syn, tmp.name)
    rows = []
    for steps in args.steps:
        row: dict = {"syn_steps": steps}
        grads = {}
        for method in ("mtt", "tesla"):
            out = iteration(method, syn, steps, args.width)
            grads[method] = out.pop("grad")
            row[method] = {"autograd_peak_bytes": out["autograd_peak_bytes"]}
            if not args.no_rss:
                cmd = [sys.executable, __file__, "--child", method, "--steps-one", str(steps), "--width",
                       str(args.width), "--set-file", tmp.name]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                row[method]["rss_peak_bytes"] = got["rss_peak_bytes"]
                row[method]["rss_iteration_bytes"] = got["rss_peak_bytes"] - got["rss_before_bytes"]
        row["tesla_grad_cosine_to_full"] = float(F.cosine_similarity(grads["tesla"].flatten(),
                                                                     grads["mtt"].flatten(), dim=0))
        print(f"syn_steps {steps}: autograd MB mtt {row['mtt']['autograd_peak_bytes'] / 2**20:.1f}, tesla "
              f"{row['tesla']['autograd_peak_bytes'] / 2**20:.1f}"
              + ("" if args.no_rss else f"; peak RSS above the runtime MB mtt "
                 f"{row['mtt']['rss_iteration_bytes'] / 2**20:.0f}, tesla {row['tesla']['rss_iteration_bytes'] / 2**20:.0f}")
              + f"; tesla grad cosine {row['tesla_grad_cosine_to_full']:.3f}")
        rows.append(row)
    Path(tmp.name).unlink()
    first, last = rows[0], rows[-1]
    ratio = {m: last[m]["autograd_peak_bytes"] / first[m]["autograd_peak_bytes"] for m in ("mtt", "tesla")}
    result = {
        "schema": 1, "kind": "perf",
        "name": f"trajectory_memory_convnet{args.width}_ipc{args.ipc}",
        "setting": {"model": f"convnet width {args.width}", "ipc": args.ipc, "batch_syn": "all",
                    "dsa": True, "dataset": args.dataset, "precision": "fp32"},
        "rows": rows,
        "ratio_last_first": {"steps": [first["syn_steps"], last["syn_steps"]], **ratio},
        **provenance(),
    }
    write_record(args.out, result)
    print(f"mtt memory ratio {last['syn_steps']}/{first['syn_steps']} steps: {ratio['mtt']:.2f}")
    print(f"tesla memory ratio {last['syn_steps']}/{first['syn_steps']} steps: {ratio['tesla']:.2f}")
    return result


if __name__ == "__main__":
    main()
