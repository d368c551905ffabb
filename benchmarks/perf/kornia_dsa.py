"""Should DSA be built on kornia? Time the siamese DSA ops, ours vs ``kornia.augmentation``.

The workload of one DM / DSA matching step on Fashion-MNIST: 10 classes x (128 real + 10
synthetic) images of 1x28x28, one transform per class shared by its real and synthetic images
(siamese), forward and backward to the synthetic images. For each op with a kornia counterpart:

- scale: ours ``DSA(scale)`` vs ``RandomAffine(degrees=0, scale=(1/1.2, 1.2, 1/1.2, 1.2))``
- rotate: ours ``DSA(rotate)`` vs ``RandomRotation(15)``
- crop (translate by <= 0.125 H): ours ``DSA(crop)`` vs ``RandomAffine(degrees=0, translate=(0.125, 0.125))``
- flip: ours ``DSA(flip)`` vs ``RandomHorizontalFlip``
- color: ours ``DSA(color)`` vs ``ColorJiggle(brightness=0.5, contrast=0.5, saturation=1)`` on 3 channels

kornia draws per-sample parameters; siamese use draws them for one image per class and replays
them (``forward(x, params=...)``) on the class's repeated batch. Timed alternately in one
process, medians; the JSON records the ratio kornia / ours per op. (The distributions also
differ in places: kornia's translate is continuous where DSA's crop shifts whole pixels, its
colour ops clamp to [0, 1] and act on unnormalised images; only the cost is compared.)

    python benchmarks/perf/kornia_dsa.py --out benchmarks/results/perf/kornia_dsa.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch
from _common import alternate, provenance, write_record  # noqa: I001

from condense.augment import DSA

K, REAL, SYN = 10, 128, 10


def ours(op: str, channels: int):  # noqa: ANN201
    dsa = DSA(op)
    g = torch.Generator().manual_seed(0)

    def run(real: torch.Tensor, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = dsa.sample_per_group(K, 1, g)
        return dsa.apply_grouped(real, p), dsa.apply_grouped(syn, p)

    return run


def kornia_op(op: str, channels: int):  # noqa: ANN201
    import kornia.augmentation as KA

    aug = {
        "scale": lambda: KA.RandomAffine(degrees=0.0, scale=(1 / 1.2, 1.2, 1 / 1.2, 1.2), p=1.0),
        "rotate": lambda: KA.RandomRotation(15.0, p=1.0),
        "crop": lambda: KA.RandomAffine(degrees=0.0, translate=(0.125, 0.125), p=1.0),
        "flip": lambda: KA.RandomHorizontalFlip(p=0.5),
        "color": lambda: KA.ColorJiggle(brightness=0.5, contrast=0.5, saturation=1.0, p=1.0),
    }[op]()

    def run(real: torch.Tensor, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aug(real[:, 0])  # one draw per class (K samples)
        params = aug._params

        def replay(x: torch.Tensor) -> torch.Tensor:  # (K, B, C, H, W): class k's draw for each of its B
            b = x.shape[1]
            rep = {k: (v.repeat_interleave(b, 0) if isinstance(v, torch.Tensor) and v.dim() >= 1
                       and v.shape[0] == K else v) for k, v in params.items()}
            rep["batch_prob"] = params["batch_prob"].repeat_interleave(b, 0)
            if "forward_input_shape" in rep:
                rep["forward_input_shape"] = torch.tensor([K * b, *x.shape[2:]])
            return aug(x.reshape(K * b, *x.shape[2:]), params=rep).view(x.shape)

        return replay(real), replay(syn)

    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = {}
    for op in ("scale", "rotate", "crop", "flip", "color"):
        c = 3 if op == "color" else 1
        g = torch.Generator().manual_seed(1)
        real = torch.rand(K, REAL, c, 28, 28, generator=g)
        syn = torch.rand(K, SYN, c, 28, 28, generator=g).requires_grad_(True)
        fns = {"ours": ours(op, c), "kornia": kornia_op(op, c)}

        def call(fn, real=real, syn=syn) -> None:  # noqa: ANN001
            r, s = fn(real, syn)
            (r.sum() + s.sum()).backward()
            syn.grad = None

        runs = {name: (lambda fn=fn: call(fn)) for name, fn in fns.items()}
        for r in runs.values():
            r()  # warm-up
        times, med = alternate(runs, args.repeats)
        rows[op] = {"ours_s": med["ours"], "kornia_s": med["kornia"], "kornia_over_ours": med["kornia"] / med["ours"],
                    "times_s": times}
        print(f"{op}: ours {med['ours'] * 1e3:.2f} ms, kornia {med['kornia'] * 1e3:.2f} ms, "
              f"kornia / ours {med['kornia'] / med['ours']:.2f}")
    geo = statistics.geometric_mean([r["kornia_over_ours"] for r in rows.values()])
    import kornia

    result = {"schema": 1, "kind": "perf", "name": "kornia_dsa_siamese",
              "setting": {"classes": K, "real_per_class": REAL, "syn_per_class": SYN, "image": "1x28x28 (color: 3x28x28)",
                          "backward": True, "repeats": args.repeats, "kornia": kornia.__version__},
              "ops": rows, "kornia_over_ours_geomean": geo, **provenance()}
    write_record(args.out, result)
    print(f"kornia / ours (geometric mean over ops): {geo:.2f}")
    return result


if __name__ == "__main__":
    main()
