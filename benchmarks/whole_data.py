"""Reference row: fresh ConvNets trained on the WHOLE training set, test accuracy.

    python benchmarks/whole_data.py --epochs 5 --models 3 --tag e5            # the cheap reference
    python benchmarks/whole_data.py --epochs 20 --models 2 --bf16 --curve --tag converged \
        --reference-for classic cpu                                         # the converged one

Fashion-MNIST, no augmentation, its own short schedule (the tag, default e<epochs>);
--reference-for names the budgets whose leaderboard sections take it as their whole-data
reference (HLR), as no budget trains the whole set for its 1000 synthetic-set epochs; where
several records declare it, the leaderboard takes the longest-trained. --curve records every
model's test accuracy after each epoch (the evidence that the schedule converged).

Writes benchmarks/results/<dataset>/whole/<tag>-seed<seed>.json in the one result format
(DESIGN.md). The evaluation code is the same Evaluator every synthetic set goes through.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from condense.data import build_dataset
from condense.eval import EvalConfig, Evaluator
from condense.eval.evaluator import eval_test_split
from condense.provenance import code_version, machine_info, resolve_device, write_json_atomic
from condense.runtime import keep_freed_memory
from condense.train import TrainCallback, accuracy

RESULTS = Path(__file__).resolve().parent / "results"


class TestCurve(TrainCallback):
    """Every model's test accuracy after each epoch (observes only: the models train unchanged)."""

    def __init__(self, images, labels, bf16: bool) -> None:  # noqa: ANN001
        self.images, self.labels, self.bf16 = images, labels, bf16
        self.points: list[dict] = []
        self.t0 = time.perf_counter()

    def on_epoch_end(self, state) -> None:  # noqa: ANN001
        accs = accuracy(state.models, self.images, self.labels, bf16=self.bf16)
        self.points.append({"epoch": state.epoch, "test_acc": [round(a, 4) for a in accs],
                            "wall_s": round(time.perf_counter() - self.t0, 1)})
        logging.getLogger("whole").info("epoch %d/%d test %s", state.epoch, state.epochs,
                                        " ".join(f"{a:.2f}" for a in accs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--arch", default="convnet")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--dsa", action="store_true", help="DSA augmentation during training")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tag", default=None, help="file tag (default: e<epochs>)")
    ap.add_argument("--reference-for", nargs="*", default=[], metavar="BUDGET",
                    help="budgets whose leaderboard section takes this run as its whole-data reference")
    ap.add_argument("--curve", action="store_true", help="record test accuracy after every epoch")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    keep_freed_memory()
    device = resolve_device(a.device)
    data = build_dataset(a.dataset, device=device)
    cfg = EvalConfig(archs=[a.arch], num_models=a.models, epochs=a.epochs, dsa=a.dsa, bf16=a.bf16, seed=a.seed)
    t0 = time.perf_counter()
    ev = Evaluator(cfg, data, device)
    curve = TestCurve(*eval_test_split(data, cfg.test_size), bf16=a.bf16) if a.curve else None
    rep = ev.evaluate_whole(callbacks=[curve] if curve else ())
    tag = a.tag or f"e{a.epochs}{'-dsa' if a.dsa else ''}{'-bf16' if a.bf16 else ''}"
    rec = {
        "schema": 1, "kind": "accuracy", "method": "whole", "flip": False, "dataset": a.dataset,
        "ipc": None, "budget": tag, "seed": a.seed, "reference_for": list(a.reference_for),
        "config": {"reference": "whole training set", **vars(a)},
        "code_version": code_version(), "machine": machine_info(device),
        "distill": {"wall_s": 0.0, "iterations": 0},
        "eval": {"protocol": rep.protocol, "runs": rep.runs, "summary": rep.summary, "wall_s": round(rep.wall_s, 1),
                 **({"curve": curve.points} if curve else {})},
        "command": "python " + " ".join(shlex.quote(s) for s in sys.argv),
    }
    out = Path(a.out) if a.out else RESULTS / a.dataset / "whole" / f"{tag}-seed{a.seed}.json"
    write_json_atomic(out, rec)
    s = rep.summary[a.arch]
    print(f"whole {a.dataset} {a.arch} {a.epochs} epochs: {s['mean']:.2f} +- {s['std']:.2f} (n={s['n']}) "
          f"in {time.perf_counter() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
