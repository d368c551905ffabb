"""Choose between distillation settings on held-out real TRAINING images, never the test set.

    python benchmarks/select_on_val.py --name dsa_ipc1_batch_real \\
        --arm batch_real256=fashion_mnist/dsa/ipc1-cpu-seed0.json,fashion_mnist/dsa/ipc1-cpu-seed1.json \\
        --arm batch_real128=fashion_mnist/dsa/ipc1-cpu-batch_real128-seed0.json,...

Each ``--arm NAME=R1,R2,...`` lists result records (paths relative to ``--results``) of one
setting, one per distillation seed. Every record's synthetic set (its ``run_dir``) is evaluated
again under that record's own evaluation protocol (same model seeds, so the very models behind
its test figure; the script checks that the test accuracies come out identical) with
``report_val``: each model is also scored on the evaluator's validation split, ``val_size`` real
training images drawn with a fixed seed.

The rule, fixed before any validation figure is seen: the arm with the higher mean validation
accuracy over all its models (seeds x models) is chosen. Test accuracies are written beside it for
the record and play no part in the choice. Caveat: the validation images are held out from the
evaluation models' training (which sees only the synthetic set) but not from distillation, which
sampled its real batches from the whole training split; with a few synthetic images distilled
from 60000 this favours neither arm in any way we can see, and it is said in the record.

Writes ``benchmarks/results/perf/<name>_val_study.json`` (``kind: "study"``), listed by the
report's Studies table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from condense.artifacts import load_synset
from condense.data import build_dataset
from condense.eval import EvalConfig, Evaluator
from condense.provenance import code_version, machine_info, resolve_device, write_json_atomic
from condense.runtime import keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
RULE = ("the arm with the higher mean validation accuracy over all its models (seeds x models); "
        "test accuracies are recorded but play no part")


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``NAME=R1,R2`` -> ``(NAME, [R1, R2])``."""
    name, sep, paths = text.partition("=")
    files = [p for p in paths.split(",") if p]
    if not sep or not name or not files:
        raise SystemExit(f"--arm {text!r}: expected NAME=RECORD[,RECORD...]")
    return name, files


def eval_config(protocol: dict[str, Any]) -> EvalConfig:
    """The record's evaluation protocol as an :class:`EvalConfig`, with ``report_val`` on."""
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    return EvalConfig(**{**{k: v for k, v in protocol.items() if k in names}, "report_val": True})


def evaluate_record(path: Path, device: Any, cache: dict[str, Any]) -> dict[str, Any]:
    """Re-evaluate one record's set with validation scores; its test figures must reproduce."""
    rec = json.loads(path.read_text())
    cfg = eval_config(rec["eval"]["protocol"])
    if rec["dataset"] not in cache:
        cache[rec["dataset"]] = build_dataset(rec["dataset"], device=device)
    syn = load_synset(rec["run_dir"], device=device)
    rep = Evaluator(cfg, cache[rec["dataset"]], device).evaluate(syn)
    recorded = [r["test_acc"] for r in rec["eval"]["runs"]]
    again = [r["test_acc"] for r in rep.runs]
    if again != recorded:
        logging.warning("%s: test accuracies %s differ from the record's %s (not the same models: other "
                        "code or machine?)", path, again, recorded)
    return {
        "record": str(path.relative_to(RESULTS)) if path.is_relative_to(RESULTS) else str(path),
        "seed": rec["seed"], "iterations": rec["distill"]["iterations"],
        "distill_wall_s": rec["distill"]["wall_s"], "run_dir": rec["run_dir"],
        "val_acc": [r["val_acc"] for r in rep.runs], "test_acc": again,
        "test_reproduced": again == recorded,
        "eval_wall_s": round(rep.wall_s, 1), "val_images": rep.protocol["val_images"],
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4),
            "n": len(values)}


def arm_result(sets: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's pooled validation / test summaries and the spread of its per-seed validation means."""
    val = [a for s in sets for a in s["val_acc"]]
    test = [a for s in sets for a in s["test_acc"]]
    seed_means = [statistics.fmean(s["val_acc"]) for s in sets]
    se = statistics.stdev(seed_means) / math.sqrt(len(seed_means)) if len(seed_means) > 1 else None
    return {"summary": {"val": _summary(val), "test": _summary(test)},
            "val_seed_means": [round(m, 4) for m in seed_means],
            "val_se_of_seed_mean": round(se, 4) if se is not None else None, "sets": sets}


def choose(arms: dict[str, dict[str, Any]]) -> tuple[str, str, float, float | None]:
    """The rule: the arm with the higher pooled validation mean.

    Returns:
        ``(chosen, runner_up, validation margin in points, standard error of the difference of
        the two arms' seed means or None with a single seed)``.
    """
    by_val = sorted(arms, key=lambda k: arms[k]["summary"]["val"]["mean"], reverse=True)
    chosen, runner_up = by_val[0], by_val[1]
    ses = [arms[k]["val_se_of_seed_mean"] for k in (chosen, runner_up)]
    se_diff = math.sqrt(sum(s * s for s in ses)) if None not in ses else None
    margin = arms[chosen]["summary"]["val"]["mean"] - arms[runner_up]["summary"]["val"]["mean"]
    return chosen, runner_up, margin, se_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="study name (file <name>_val_study.json)")
    ap.add_argument("--question", default=None)
    ap.add_argument("--arm", action="append", required=True, help="NAME=RECORD[,RECORD...]")
    ap.add_argument("--results", default=str(RESULTS), help="where the record paths are relative to")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    arms = dict(parse_arm(t) for t in a.arm)
    if len(arms) < 2:
        raise SystemExit("need at least two --arm to choose between")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    keep_freed_memory()
    device = resolve_device(a.device)
    cache: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name, files in arms.items():
        sets = [evaluate_record(Path(a.results) / f, device, cache) for f in files]
        out[name] = arm_result(sets)
        logging.info("%s: val %s, test %s", name, out[name]["summary"]["val"], out[name]["summary"]["test"])
    chosen, runner_up, margin, se_diff = choose(out)
    rec = {
        "schema": 1, "kind": "study", "name": f"{a.name}_val",
        "question": a.question or f"which of {', '.join(arms)} to use, chosen on held-out real training images",
        "set": "; ".join(f"{k}: {', '.join(v)}" for k, v in arms.items()),
        "rule": RULE, **out, "chosen": chosen,
        "val_margin_points": round(margin, 4),
        "val_margin_se_points": round(se_diff, 4) if se_diff is not None else None,
        "test_reproduced": all(s["test_reproduced"] for v in out.values() for s in v["sets"]),
        "accuracy_delta_points": round(out[chosen]["summary"]["test"]["mean"]
                                       - out[runner_up]["summary"]["test"]["mean"], 4),
        "note": (f"chosen on validation: {chosen} (+{margin:.2f} points over {runner_up}, SE of the "
                 f"difference of seed means {se_diff:.2f})" if se_diff is not None else
                 f"chosen on validation: {chosen} (+{margin:.2f} points over {runner_up})")
                + "; delta = the chosen arm's test mean minus the runner-up's; validation images are "
                  "held out from the evaluation models' training, not from distillation",
        "command": "python " + " ".join(shlex.quote(s) for s in sys.argv),
        "code_version": code_version(), "machine": machine_info(device),
    }
    path = Path(a.out) if a.out else RESULTS / "perf" / f"{a.name}_val_study.json"
    write_json_atomic(path, rec)
    print(f"{path}: chosen {chosen} (val margin {margin:+.2f} points); " + "; ".join(
        f"{k}: val {v['summary']['val']['mean']:.2f}, test {v['summary']['test']['mean']:.2f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
