"""Benchmark result files (DESIGN.md "Benchmark results"): paths, validation, loading, aggregation.

One JSON file per run at ``<results>/<dataset>/<method>[+multi<f>][+flip]/ipc<k>-<budget>-seed<s>.json``;
``kind: "accuracy"`` records feed the leaderboard tables, ``kind: "ablation"`` ones (tagged
variant runs) its Ablations table, ``kind: "perf"`` records its Speed section and ``kind: "study"``
records (a measured side question, e.g. bf16's accuracy effect in evaluation) its Studies section.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = 1
WHOLE = "whole"
#: Evaluation protocols a record can be scored under; their cells never share a table.
HARD, SOFT = "hard", "soft"
#: ``eval.protocol.labels`` of the soft-label protocol (:data:`condense.eval.soft.SOFT_LABELS`).
SOFT_PROTOCOL_LABELS = "soft (teacher)"


def record_protocol(rec: dict[str, Any]) -> str:
    """``soft`` for a record evaluated under the soft-label protocol (``eval.protocol.protocol``
    soft, or its labels "soft (teacher)"), whatever its budget's name; else ``hard`` (a set with
    learned soft labels under the hard-label protocol, e.g. DATM, stays ``hard``)."""
    ev = rec.get("eval") if isinstance(rec.get("eval"), dict) else {}
    proto = ev.get("protocol") if isinstance(ev.get("protocol"), dict) else {}
    return SOFT if proto.get("protocol") == SOFT or proto.get("labels") == SOFT_PROTOCOL_LABELS else HARD


def method_label(method: str, flip: bool, variant: str = "") -> str:
    """The method key with its variants: ``"dsa+flip"``, ``"dm+multi2"``, ``"dsa+multi2+learned+flip"``
    (``variant``: the record's ``variant``, what departs from the method's plain form: the
    parametrization label and/or ``learned`` / ``hard`` labels forced by ``labels=``)."""
    return method + (f"+{variant}" if variant else "") + ("+flip" if flip else "")


def parse_label(label: str) -> tuple[str, str, bool]:
    """``(method, variant, flip)`` of a :func:`method_label`."""
    parts = label.split("+")
    flip = parts[-1] == "flip"
    if flip:
        parts = parts[:-1]
    return parts[0], "+".join(parts[1:]), flip


def result_stem(ipc: int | str, budget: str, seed: int, tag: str | None = None) -> str:
    """``ipc10-cpu-seed0`` (or ``ipc10-cpu-<tag>-seed0`` for a tagged ablation run)."""
    return f"ipc{ipc}-{budget}{'-' + tag if tag else ''}-seed{seed}"


def result_path(results_dir: str | Path, dataset: str, method: str, flip: bool, ipc: int, budget: str,
                seed: int, tag: str | None = None, variant: str = "") -> Path:
    """Where the record of one run lives (the one path scheme every tool uses)."""
    return (Path(results_dir) / dataset / method_label(method, flip, variant)
            / f"{result_stem(ipc, budget, seed, tag)}.json")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def accuracy_problems(rec: Any) -> list[str]:
    """Why ``rec`` is not a usable accuracy record (empty list: it is)."""
    if not isinstance(rec, dict):
        return [f"not a JSON object ({type(rec).__name__})"]
    bad = []
    if rec.get("schema") != SCHEMA:
        bad.append(f"schema {rec.get('schema')!r} (expected {SCHEMA})")
    want_kind = "ablation" if rec.get("tag") else "accuracy"
    if rec.get("kind") != want_kind:
        bad.append(f"kind {rec.get('kind')!r} (expected {want_kind!r})")
    for key in ("method", "dataset", "budget"):
        if not isinstance(rec.get(key), str) or not rec.get(key):
            bad.append(f"{key} missing")
    ipc = rec.get("ipc")
    if not (ipc is None and rec.get("method") == WHOLE) and not (isinstance(ipc, int) and ipc > 0):
        bad.append(f"ipc {ipc!r}")
    if not isinstance(rec.get("seed"), int):
        bad.append(f"seed {rec.get('seed')!r}")
    ev = rec.get("eval")
    summary = ev.get("summary") if isinstance(ev, dict) else None
    if not isinstance(summary, dict) or not summary:
        bad.append("eval.summary missing (run without evaluation?)")
    else:
        for arch, s in summary.items():
            if not (isinstance(s, dict) and _is_num(s.get("mean")) and _is_num(s.get("std"))
                    and isinstance(s.get("n"), int) and s["n"] > 0):
                bad.append(f"eval.summary.{arch} is not {{mean, std, n}}")
    return bad


def perf_problems(rec: Any) -> list[str]:
    """Why ``rec`` is not a usable perf record (empty list: it is)."""
    if not isinstance(rec, dict) or rec.get("kind") != "perf":
        return ["not a perf record"]
    return [] if isinstance(rec.get("name"), str) else ["name missing"]


def study_problems(rec: Any) -> list[str]:
    """Why ``rec`` is not a usable study record (empty list: it is)."""
    if not isinstance(rec, dict) or rec.get("kind") != "study":
        return ["not a study record"]
    return [f"{k} missing" for k in ("name", "question") if not isinstance(rec.get(k), str)]


def read_json(path: Path) -> Any:
    """Parsed JSON, or ``None`` when the file is missing or unparsable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_valid_result(path: Path, expect: dict[str, Any] | None = None) -> tuple[bool, str]:
    """Whether ``path`` holds a complete accuracy record (matching ``expect``'s fields).

    Returns:
        ``(ok, reason)``; ``reason`` says what is wrong ("missing", "unparsable", ...).
    """
    if not Path(path).exists():
        return False, "missing"
    rec = read_json(path)
    if rec is None:
        return False, "unparsable"
    bad = accuracy_problems(rec)
    for key, want in (expect or {}).items():
        if rec.get(key) != want:
            bad.append(f"{key} is {rec.get(key)!r}, expected {want!r}")
    return (not bad), ("; ".join(bad) if bad else "ok")


@dataclass
class Results:
    """Every record found under a results folder."""

    accuracy: list[dict[str, Any]] = field(default_factory=list)
    ablation: list[dict[str, Any]] = field(default_factory=list)
    perf: list[dict[str, Any]] = field(default_factory=list)
    study: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """Every usable record (accuracy, ablation, perf, study), in that order."""
        return [*self.accuracy, *self.ablation, *self.perf, *self.study]


def is_dirty(rec: dict[str, Any]) -> bool:
    """Whether ``rec`` was written from a working tree with uncommitted changes
    (``code_version.dirty: true``; a record without a ``code_version`` is not called dirty)."""
    code = rec.get("code_version")
    return isinstance(code, dict) and code.get("dirty") is True


def dirty_paths(results: Results) -> list[str]:
    """The files of the usable records of ``results`` written from a dirty tree, sorted."""
    return sorted(str(r.get("_path")) for r in results.records() if is_dirty(r))


def check_clean(results: Results, allow_dirty: bool = False) -> None:
    """Refuse records written from a dirty tree (their code is not a commit anyone can check out).

    Raises:
        ConfigError: some record has ``code_version.dirty: true`` and ``allow_dirty`` is False;
            the message names every such file and how to allow them.
    """
    bad = dirty_paths(results)
    if bad and not allow_dirty:
        from condense.errors import ConfigError

        raise ConfigError(f"{len(bad)} result file(s) were written from a dirty tree (code_version.dirty: "
                          f"true): {', '.join(bad)}; rerun them from a clean commit or remove them, or pass "
                          f"allow_dirty=True (condense-report allow_dirty=true) to include them anyway")
    if bad:
        log.warning("including %d record(s) written from a dirty tree (allow_dirty)", len(bad))


def load_results(results_dir: str | Path) -> Results:
    """Read every ``*.json`` under ``results_dir`` (sorted), classified by ``kind``.

    Files that are unparsable or incomplete are listed in ``skipped`` with the reason.
    """
    out = Results()
    root = Path(results_dir)
    for path in sorted(root.rglob("*.json")):
        rec = read_json(path)
        if rec is None:
            out.skipped.append((path, "unparsable"))
            continue
        kind = rec.get("kind") if isinstance(rec, dict) else None
        check = {"perf": perf_problems, "study": study_problems}.get(kind, accuracy_problems)
        bad = check(rec)
        if bad:
            out.skipped.append((path, "; ".join(bad)))
            log.warning("skipping %s: %s", path, "; ".join(bad))
            continue
        rec = {**rec, "_path": str(path)}
        # ablation: a tagged variant run (e.g. fp32 vs the budget's bf16): listed, never a cell
        {"perf": out.perf, "ablation": out.ablation, "study": out.study}.get(kind, out.accuracy).append(rec)
    return out


@dataclass(frozen=True, order=True)
class CellKey:
    """One leaderboard cell: dataset x budget x method (+flip) x ipc (``None`` for whole data) x
    evaluation protocol (``hard`` or ``soft``: :func:`record_protocol`) x parametrization
    (``variant``: ``""`` for the plain method, ``multi2``, ``learned``, ``multi2+learned``...)."""

    dataset: str
    budget: str
    method: str
    flip: bool
    ipc: int | None
    protocol: str = HARD
    variant: str = ""

    @property
    def label(self) -> str:
        return method_label(self.method, self.flip, self.variant)


@dataclass
class Cell:
    """Accuracy (percent) of one cell pooled over its records (seeds)."""

    key: CellKey
    arch: str
    mean: float
    std: float
    n: int
    seeds: list[int]
    distill_s: float | None  # mean distillation wall time over the seeds
    iterations: int | None  # iterations reached (minimum over seeds)
    records: list[dict[str, Any]]
    prepare_s: float | None = None  # longest prepare phase over the seeds (None: no record has one)


def first_arch(rec: dict[str, Any]) -> str:
    """The first evaluated architecture (the protocol's ``archs[0]``, else the first summary key)."""
    ev = rec["eval"]
    archs = (ev.get("protocol") or {}).get("archs") or []
    if archs and archs[0] in ev["summary"]:
        return str(archs[0])
    return str(next(iter(ev["summary"])))


def pool(stats: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """Pool ``(mean, population std, n)`` groups into the statistics of all their values."""
    total = sum(n for _, _, n in stats)
    mean = sum(m * n for m, _, n in stats) / total
    var = sum(n * (s * s + (m - mean) ** 2) for m, s, n in stats) / total
    return mean, math.sqrt(max(var, 0.0)), total


def cell_key(rec: dict[str, Any]) -> CellKey:
    ipc = rec.get("ipc")
    return CellKey(str(rec["dataset"]), str(rec["budget"]), str(rec["method"]), bool(rec.get("flip")),
                   None if rec["method"] == WHOLE else int(ipc), record_protocol(rec), str(rec.get("variant") or ""))


def aggregate(records: list[dict[str, Any]]) -> dict[CellKey, Cell]:
    """Group accuracy records by cell; each cell pools its seeds' first-arch summaries.

    A single record's cell shows exactly that record's ``eval.summary`` numbers.
    """
    groups: dict[CellKey, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[cell_key(rec)].append(rec)
    cells = {}
    for key, recs in sorted(groups.items()):
        recs = sorted(recs, key=lambda r: r["seed"])
        arch = first_arch(recs[0])
        stats = [(float(s["mean"]), float(s["std"]), int(s["n"]))
                 for s in (r["eval"]["summary"].get(arch) for r in recs) if s is not None]
        mean, std, n = pool(stats)
        walls = [float(r["distill"]["wall_s"]) for r in recs
                 if isinstance(r.get("distill"), dict) and _is_num(r["distill"].get("wall_s"))]
        its = [int(r["distill"]["iterations"]) for r in recs
               if isinstance(r.get("distill"), dict) and isinstance(r["distill"].get("iterations"), int)]
        cells[key] = Cell(key, arch, mean, std, n, [int(r["seed"]) for r in recs],
                          sum(walls) / len(walls) if walls else None, min(its) if its else None, recs,
                          prepare_s(recs))
    return cells


def prepare_s(recs: list[dict[str, Any]]) -> float | None:
    """The longest cold prepare (teachers / experts, off the distillation clock) of ``recs``:
    per record ``prepare.cold_s`` (what training its cached teachers took) where the method
    reports it, else ``prepare.wall_s`` (what this run's prepare took).

    The longest, not the mean: the first seed of a cell usually trains the teachers (a cold run)
    and the later ones load them from the cache, and the cold cost is the one a reader needs.
    ``None`` when no record has a ``prepare`` block (records written before that phase existed,
    and methods without one).
    """
    vals = []
    for r in recs:
        p = r.get("prepare")
        if isinstance(p, dict):
            got = [float(p[k]) for k in ("wall_s", "cold_s") if _is_num(p.get(k))]
            if got:
                vals.append(max(got))
    return max(vals) if vals else None


def run_dir_of(rec: dict[str, Any]) -> Path | None:
    """The run directory a record names (``run_dir``, or ``bench.run_dir`` added by condense-bench).

    Records name it relative to the repository root (absolute only when it lay outside the
    repository), so a relative one resolves against the directory the report is built in.
    """
    for value in (rec.get("run_dir"), (rec.get("bench") or {}).get("run_dir"),
                  (rec.get("config") or {}).get("run_dir")):
        if isinstance(value, str) and value:
            return Path(value)
    return None
