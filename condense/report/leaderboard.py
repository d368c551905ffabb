"""The leaderboard: result files -> Markdown (+ figures) and one self-contained HTML page.

Everything shown is computed from the result files alone (plus the hand-entered published numbers
of :mod:`condense.report.published`). Results of different budgets never share a table: there is
one section per dataset x budget x evaluation protocol, and its references (whole data, random
subset) must come from the same budget and protocol, else the score cells show "—". Records of the
soft-label protocol (:func:`~condense.report.records.record_protocol`) form their own sections
whatever their budget's name, with the images' and the labels' bytes beside each row.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condense.report import plots
from condense.report.document import Code, Comment, Document, Heading, Image, Paragraph, Table
from condense.report.document import to_html as render_html
from condense.report.document import to_markdown as render_markdown
from condense.report.published import SOURCE as PUBLISHED_SOURCE
from condense.report.published import published_rows, published_value
from condense.report.records import (
    HARD,
    SOFT,
    WHOLE,
    Cell,
    CellKey,
    Results,
    aggregate,
    cell_key,
    check_clean,
    load_results,
    method_label,
    parse_label,
    prepare_s,
    record_protocol,
)
from condense.report.scores import FORMULA as SCORE_FORMULA
from condense.report.scores import LRS_WEIGHT, hlr, ior, lrs

log = logging.getLogger(__name__)

DASH = "—"
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "svhn": "SVHN", "tiny_imagenet": "Tiny ImageNet"}
METHOD_ORDER = ("random", "herding", "kcenter", "grand", "el2n", "forgetting", "dc", "dsa", "dm", "datadam",
                "mtt", "ftd", "tesla", "datm", "sre2l", "cda", "rded", "committee")


def _order(label: str) -> tuple[int, str]:
    base, variant, flip = parse_label(label)
    idx = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (idx, base + ("1" if flip else "0") + variant)


def fmt_acc(cell: Cell | None) -> str:
    """``"82.31 ± 0.45 (3)"`` (mean ± std over n models), or "—"."""
    return DASH if cell is None else f"{cell.mean:.2f} ± {cell.std:.2f} ({cell.n})"


def fmt_num(x: float | None, digits: int = 2, signed: bool = False) -> str:
    if x is None:
        return DASH
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)


@dataclass
class Section:
    """One dataset x budget x evaluation protocol: its cells and references."""

    dataset: str
    budget: str
    cells: dict[CellKey, Cell]  # synthetic / selection cells (no whole data)
    whole: Cell | None
    other_whole: list[Cell] = field(default_factory=list)  # whole-data cells of other budgets
    whole_declared: bool = False  # ``whole`` is another schedule's record declared as this budget's reference
    protocol: str = HARD  # ``soft``: the soft-label protocol's cells (never in a hard-label section)

    @property
    def soft(self) -> bool:
        return self.protocol == SOFT

    @property
    def title(self) -> str:
        return (f"{DATASET_NAMES.get(self.dataset, self.dataset)} — budget `{self.budget}`"
                + (", soft-label protocol" if self.soft else ""))

    @property
    def ipcs(self) -> list[int]:
        return sorted({k.ipc for k in self.cells if k.ipc is not None})

    @property
    def labels(self) -> list[str]:
        return sorted({k.label for k in self.cells}, key=_order)

    def cell(self, label: str, ipc: int) -> Cell | None:
        method, variant, flip = parse_label(label)
        return self.cells.get(CellKey(self.dataset, self.budget, method, flip, ipc, self.protocol, variant))

    def random(self, ipc: int) -> Cell | None:
        return self.cell("random", ipc)

    def display(self, label: str) -> str:
        """``label``, marked "(learned labels)" when its sets carry labels learned during
        distillation (``method_config.soft_labels``, e.g. DATM): not comparable to hard-label rows."""
        if "learned" in parse_label(label)[1].split("+"):
            return label  # a labels=learned variant says so in its label
        learned = any(bool((r.get("method_config") or {}).get("soft_labels"))
                      for k in self.ipcs if (c := self.cell(label, k)) is not None for r in c.records)
        return f"{label} (learned labels)" if learned else label


def trained_epochs(cell: Cell) -> int:
    """The fewest epochs any of the cell's records trained its models for (0 when unrecorded)."""
    return min(int(((r.get("eval") or {}).get("protocol") or {}).get("epochs") or 0) for r in cell.records)


def sections(cells: dict[CellKey, Cell]) -> list[Section]:
    """Split cells into dataset x budget x protocol sections, attaching the whole-data reference.

    The reference is the whole-data cell of the same budget and protocol, else one of the same
    protocol whose records declare themselves the reference for this budget (``reference_for``:
    the whole training set cannot be trained for the budget's 1000 epochs, so it is trained on its
    own short schedule; where several declare it, the longest-trained wins, the others are listed).
    A hard-label reference never serves a soft-label section, nor the reverse.
    """
    wholes: dict[str, list[Cell]] = defaultdict(list)
    groups: dict[tuple[str, str, str], dict[CellKey, Cell]] = defaultdict(dict)
    for key, cell in cells.items():
        if key.method == WHOLE:
            wholes[key.dataset].append(cell)
        else:
            groups[(key.dataset, key.budget, key.protocol)][key] = cell
    out = []
    for (dataset, budget, protocol), group in sorted(groups.items()):
        mine = [w for w in wholes[dataset] if w.key.protocol == protocol]
        same = [w for w in mine if w.key.budget == budget]
        declared = sorted((w for w in mine
                           if w.key.budget != budget and all(budget in (r.get("reference_for") or []) for r in w.records)),
                          key=lambda w: -trained_epochs(w))  # several declared: the longest-trained
        ref = (same or declared or [None])[0]
        out.append(Section(dataset, budget, group, ref, [w for w in wholes[dataset] if w is not ref],
                           whole_declared=not same and ref is not None, protocol=protocol))
    return out


def _values(recs: list[dict[str, Any]], getter) -> list[Any]:  # noqa: ANN001
    seen: list[Any] = []
    for r in recs:
        v = getter(r)
        if v is not None and v not in seen:
            seen.append(v)
    return seen


def _join(vals: list[Any]) -> str:
    return " or ".join(str(v) for v in vals) if vals else "?"


def _epochs_by_ipc(protos: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """"E at ipc K; ..." from ``(record, eval protocol)`` pairs (distinct epochs per ipc)."""
    by_ipc: dict[Any, list[Any]] = defaultdict(list)
    for r, p in protos:
        if p.get("epochs") is not None and p["epochs"] not in by_ipc[r.get("ipc")]:
            by_ipc[r.get("ipc")].append(p["epochs"])
    return "; ".join(f"{_join(v)} at ipc {k}" for k, v in sorted(by_ipc.items(), key=lambda kv: kv[0] or 0)
                     if k is not None)


def protocol_text(recs: list[dict[str, Any]]) -> str:
    """One paragraph describing the evaluation protocol of ``recs`` (from their ``eval.protocol``)."""
    protos = [(r, (r.get("eval") or {}).get("protocol") or {}) for r in recs]
    get = lambda key: _values([p for _, p in protos], lambda p: p.get(key))  # noqa: E731
    archs = _values([p for _, p in protos], lambda p: ", ".join(p.get("archs") or []) or None)
    epochs = _epochs_by_ipc(protos)
    dsa = get("dsa")
    strategies = get("dsa_strategy")
    aug = ("DSA augmentation during training" + (f" (strategy {_join(strategies)})" if strategies else "")
           if dsa == [True] else "no augmentation during training" if dsa == [False]
           else f"DSA during training: {_join(dsa)}")
    decay = _join(get("lr_decay_at") or [0.5])
    lr_sel = [p.get("lr_selection") for _, p in protos if p.get("lr_selection")]
    learned = [p.get("learned_lr") for _, p in protos if p.get("learned_lr") is not None]
    lr_text = f"lr {_join(get('lr'))}"
    if learned:
        lr_text += " (or the set's learned lr where it has one)"
    if lr_sel:
        lr_text += " (chosen per set on a held-out split of real training images)"
    return (f"Each set trains {_join(get('num_models'))} fresh model(s) of {_join(archs)} from scratch: "
            f"SGD {lr_text}, momentum {_join(get('momentum'))}, weight decay {_join(get('weight_decay'))}, "
            f"batch {_join(get('batch_size'))}, lr ×0.1 once at {decay} of the epochs; {aug}; "
            f"epochs: {epochs or _join(get('epochs'))}; {_join(get('labels'))} labels; test accuracy on "
            f"{_join(get('test_images'))} test images, mean ± std over the models (pooled over seeds).")


def machine_desc(machine: dict[str, Any]) -> str:
    """One machine as text: model, cores, ISA (where recorded), device, torch version."""
    m = machine or {}
    return ", ".join(str(x) for x in (
        m.get("gpu") or m.get("cpu"), f"{m.get('cores')} cores" if m.get("cores") else None,
        m.get("cpu_isa"), f"device {m.get('device')}" if m.get("device") else None,
        f"torch {m.get('torch')}" if m.get("torch") else None) if x) or "unknown"


def machine_ids(recs: list[dict[str, Any]]) -> dict[str, str]:
    """``machine_desc -> "M1", "M2", ...``, most records first (ties: by description)."""
    counts = Counter(machine_desc(r.get("machine") or {}) for r in recs)
    ranked = sorted(counts, key=lambda d: (-counts[d], d))
    return {d: f"M{i}" for i, d in enumerate(ranked, 1)}


def record_machines(recs: list[dict[str, Any]], ids: dict[str, str]) -> str:
    """The ids of the machines that produced ``recs`` ("M1", "M1, M2"), or a dash."""
    found = sorted({ids.get(machine_desc(r.get("machine") or {}), DASH) for r in recs})
    return ", ".join(found) or DASH


def machine_lines(recs: list[dict[str, Any]], ids: dict[str, str]) -> list[str]:
    """One line per machine in id order (id, description, record count, GEMM probe range), then the
    code versions; ``ids`` from :func:`machine_ids` over (at least) ``recs``."""
    machines: Counter[str] = Counter()
    probes: dict[str, list[float]] = {}
    codes: Counter[str] = Counter()
    for r in recs:
        m = r.get("machine") or {}
        desc = machine_desc(m)
        machines[desc] += 1
        speed = m.get("gemm_gflops") if isinstance(m.get("gemm_gflops"), dict) else {}
        if (start := _num(speed.get("start"))) is not None:
            probes.setdefault(desc, []).append(start)
        c = r.get("code_version") or {}
        sha = c.get("git_sha")
        codes[(f"`{sha[:10]}`" if sha else "unknown") + (" (uncommitted changes)" if c.get("dirty") else "")] += 1

    def probe_text(desc: str) -> str:
        vals = probes.get(desc)
        if not vals:
            return ""
        return (f" Speed probe (fp32 GEMM, `machine.gemm_gflops`) at the start of {len(vals)} of "
                f"them: {min(vals):.0f}–{max(vals):.0f} GFLOP/s.")

    lines = [f"{mid}: {desc} — {machines[desc]} record(s).{probe_text(desc)}"
             for desc, mid in ids.items() if desc in machines]
    if codes:
        lines.append("Code versions (record count): "
                     + ", ".join(f"{k} ({v})" for k, v in codes.most_common()) + ".")
    return lines


def accuracy_table(sec: Section) -> Table:
    """method x ipc: ours ("mean ± std (n)") next to the published number."""
    header = ["method"]
    for k in sec.ipcs:
        header += [f"ipc {k}", f"ipc {k} published"]
    pub_whole = published_value(sec.dataset, WHOLE, None)
    rows = [["whole dataset"] + [x for _ in sec.ipcs
                                 for x in (fmt_acc(sec.whole), pub_whole.text() if pub_whole else DASH)]]
    for label in sec.labels:
        method, variant, flip = parse_label(label)
        row = [sec.display(label)]
        for k in sec.ipcs:
            pv = published_value(sec.dataset, method, k, flip, variant)
            row += [fmt_acc(sec.cell(label, k)), pv.text() if pv else DASH]
        rows.append(row)
    ours = {parse_label(lab)[0] for lab in sec.labels}
    for prow in published_rows(sec.dataset):
        if prow.method in ours or prow.method == WHOLE:
            continue
        vals = [prow.values.get(k) for k in sec.ipcs]
        if any(v is not None for v in vals):
            rows.append([f"{prow.label} (published only)"]
                        + [x for v in vals for x in (DASH, v.text() if v else DASH)])
    return Table(header, rows)


def score_rows(sec: Section) -> list[dict[str, Any]]:
    """Per (method, ipc): accuracy, HLR, IOR, LRS, distillation and prepare minutes (None where missing)."""
    out = []
    whole = sec.whole.mean if sec.whole is not None else None
    for label in sec.labels:
        for k in sec.ipcs:
            cell = sec.cell(label, k)
            if cell is None:
                continue
            rnd = sec.random(k)
            h = hlr(whole, cell.mean)
            i = ior(cell.mean, rnd.mean if rnd is not None else None)
            out.append({"label": label, "ipc": k, "cell": cell, "hlr": h, "ior": i, "lrs": lrs(h, i),
                        "minutes": None if cell.distill_s is None else cell.distill_s / 60.0,
                        "prepare_minutes": None if cell.prepare_s is None else cell.prepare_s / 60.0})
    return out


def score_table(sec: Section, ids: dict[str, str]) -> Table:
    """Scores per (method, ipc), with distillation and prepare minutes, iterations, seeds and the
    machine(s) (ids)."""
    header = ["method", "ipc", "accuracy", "HLR ↓", "IOR ↑", "LRS ↑", "distill (min)", "prepare (min)",
              "iterations", "seeds", "machine"]
    rows = []
    for s in score_rows(sec):
        c: Cell = s["cell"]
        rows.append([sec.display(s["label"]), str(s["ipc"]), fmt_acc(c), fmt_num(s["hlr"]), fmt_num(s["ior"], signed=True),
                     fmt_num(s["lrs"]), fmt_num(s["minutes"], 1), fmt_num(s["prepare_minutes"], 1),
                     DASH if c.iterations is None else str(c.iterations), ", ".join(map(str, c.seeds)),
                     record_machines(c.records, ids)])
    return Table(header, rows)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


VARIANT_KEYS = {"ours": "fp32", "ours_bf16": "bf16", "ours_compile": "compile", "ours_compile_bf16": "compile+bf16"}
SPEED_VARIANTS = tuple(VARIANT_KEYS.values())


def variant_ratios(rec: dict[str, Any]) -> dict[str, float]:
    """baseline_s / ours_s of each measured variant of a perf record (keys of :data:`SPEED_VARIANTS`),
    read from the ``variants: {ours, ours_bf16, ours_compile, ours_compile_bf16: {ratio}}`` layout
    every perf script writes (``benchmarks/perf/_common.variant_table``); without it, the record's ``ratio``.
    """
    out: dict[str, float] = {}
    vs = rec.get("variants") if isinstance(rec.get("variants"), dict) else {}
    for key, name in VARIANT_KEYS.items():
        v = vs.get(key)
        if isinstance(v, dict) and (r := _num(v.get("ratio"))) is not None:
            out[name] = r
    if "fp32" not in out and (r := _num(rec.get("ratio"))) is not None:
        out["fp32"] = r
    return out


def speed_table(perf: list[dict[str, Any]], ids: dict[str, str]) -> Table:
    """One row per perf record: each variant's ratio, the times, the baseline, the machine (id and CPU)."""
    rows = []
    for r in sorted(perf, key=lambda r: (r["name"], r.get("_path", ""))):
        ratios = variant_ratios(r)
        m = r.get("machine") or {}
        code = r.get("code_version") or {}
        sha = str(code.get("git_sha") or "")[:8] + ("+dirty" if code.get("dirty") else "")
        rows.append([r["name"], Path(r.get("_path", "")).name or DASH,
                     *[f"{ratios[v]:.2f}×" if v in ratios else DASH for v in SPEED_VARIANTS],
                     fmt_num(r.get("ours_s")), fmt_num(r.get("baseline_s")), str(r.get("baseline") or DASH),
                     str(m.get("gpu") or m.get("device") or DASH), _cpu_text(m), record_machines([r], ids),
                     sha or DASH])
    return Table(["name", "file", *[f"{v} ratio" for v in SPEED_VARIANTS], "ours fp32 (s)", "baseline (s)",
                  "baseline", "device", "CPU", "machine", "code"], rows, align="llrrrrrrlllll")


def _cpu_text(machine: dict[str, Any]) -> str:
    """``model, N cores, ISA, bf16 probe x`` from a record's ``machine`` (what it has of it)."""
    parts = [str(machine["cpu"])] if machine.get("cpu") else []
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    if machine.get("cpu_isa"):
        parts.append(str(machine["cpu_isa"]))
    if (r := _num(machine.get("bf16_speedup"))) is not None:
        parts.append(f"bf16 probe {r:.2f}×")
    return ", ".join(parts) or DASH


def _summary_text(summary: Any) -> str:
    if not isinstance(summary, dict):
        return DASH
    parts = [f"{a}: {s['mean']:.2f} ± {s['std']:.2f} ({s['n']})" for a, s in summary.items()
             if isinstance(s, dict) and {"mean", "std", "n"} <= s.keys()]
    return "; ".join(parts) or DASH


def study_table(recs: list[dict[str, Any]]) -> Table:
    """Side questions measured once (e.g. bf16 in evaluation): each arm's accuracy from its record."""
    rows = []
    for r in sorted(recs, key=lambda r: r["name"]):
        arms = [f"{k}: {_summary_text(v['summary'])}" for k, v in r.items()
                if isinstance(v, dict) and "summary" in v]
        delta = _num(r.get("accuracy_delta_points"))
        rows.append([r["name"], r["question"], str(r.get("set") or DASH), " / ".join(arms) or DASH,
                     fmt_num(delta, signed=True), str(r.get("note") or DASH)])
    return Table(["name", "question", "set", "arms", "delta (points)", "note"], rows, align="llllrl")


def _cell_of(r: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The budget's own record (same cell, same seed) of the cell an ablation record varies, if any."""
    key = cell_key(r)
    return next((c for c in cells if cell_key(c) == key and c.get("seed") == r.get("seed")), None)


def ablation_changes(r: dict[str, Any], cell: dict[str, Any] | None) -> str:
    """What an ablation run changed: its method settings that differ from the budget cell's record
    (``key=value (cell: value)``), so the text stays true when the budget itself changes later;
    without a cell (or method settings) to compare with, the ``method.*`` overrides of its command."""
    mine, theirs = r.get("method_config"), (cell or {}).get("method_config")
    if isinstance(mine, dict) and isinstance(theirs, dict):
        # settings one record predates (absent from its method_config) are not differences
        diff = [f"{k}={mine.get(k)} (cell: {theirs.get(k)})" for k in sorted(set(mine) & set(theirs))
                if k != "iterations" and mine.get(k) != theirs.get(k)]
        planned = ((r.get("distill") or {}).get("iterations_planned"),
                   ((cell or {}).get("distill") or {}).get("iterations_planned"))
        if None not in planned and planned[0] != planned[1]:
            diff.append(f"iterations cap={planned[0]} (cell: {planned[1]})")
        return " ".join(diff) or "nothing (same settings as the cell)"
    overrides = [o for o in (r.get("command") or "").split() if o.startswith("method.")]
    return " ".join(overrides) or DASH


def ablation_table(recs: list[dict[str, Any]], ids: dict[str, str],
                   cells: list[dict[str, Any]] | None = None) -> Table:
    """Tagged variant runs beside the budget's own run of the same cell (never leaderboard cells):
    the settings changed against that cell's record, and the cell's own result for comparison."""
    rows = []
    for r in sorted(recs, key=lambda r: (r["dataset"], r["budget"], r["method"], str(r.get("variant") or ""), r.get("flip", False),
                                         r["ipc"], r["tag"], r["seed"])):
        acc = "; ".join(f"{a}: {s['mean']:.2f} ± {s['std']:.2f} ({s['n']})" for a, s in r["eval"]["summary"].items())
        dist = r.get("distill") or {}
        cell = _cell_of(r, cells or [])
        if cell is None:
            cell_text = DASH
        else:
            cs = cell["eval"]["summary"]
            cell_text = "; ".join(f"{s['mean']:.2f} ± {s['std']:.2f}" for s in cs.values())
            cell_text += f" ({(cell.get('distill') or {}).get('iterations', DASH)} it., " \
                         f"{record_machines([cell], ids)})"
        rows.append([r["dataset"], r["budget"], method_label(r["method"], bool(r.get("flip")), str(r.get("variant") or "")), str(r["ipc"]),
                     r["tag"], ablation_changes(r, cell), acc, fmt_num(dist.get("wall_s"), 0),
                     fmt_num(prepare_s([r]), 0), str(dist.get("iterations", DASH)), record_machines([r], ids),
                     cell_text])
    return Table(["dataset", "budget", "method", "ipc", "tag", "changed", "accuracy", "distill s", "prepare s",
                  "iterations", "machine", "budget cell"], rows, align="lllrllrrrrll")


def soft_protocol_text(recs: list[dict[str, Any]]) -> str:
    """One paragraph describing the soft-label protocol of ``recs`` (their ``eval.protocol``)."""
    protos = [(r, (r.get("eval") or {}).get("protocol") or {}) for r in recs]
    get = lambda key: _values([p for _, p in protos], lambda p: p.get(key))  # noqa: E731
    aug = lambda key: _values([p for _, p in protos], lambda p: (p.get("augmentation") or {}).get(key))  # noqa: E731
    archs = _values([p for _, p in protos], lambda p: ", ".join(p.get("archs") or []) or None)
    epochs = _epochs_by_ipc(protos)
    scale = _join([f"{lo}–{hi}" for lo, hi in aug("crop_scale")])
    cut = [a for a in aug("cutmix_alpha") if a]
    mix = f"CutMix (Beta α {_join(cut)}, one box per batch)" if cut else "no CutMix"
    flips = aug("flip")
    flip = "flip" if flips == [True] else "no flip" if flips == [False] else f"flip: {_join(flips)}"
    sources = get("teacher_source")
    teachers = []
    if "set" in sources:
        teachers.append("a recovery set's own teachers (committee logits averaged with their weights)")
    if "config" in sources:
        specs = _values([t for _, p in protos if p.get("teacher_source") == "config" for t in p.get("teachers") or []],
                        lambda t: f"{t.get('model')} ({t.get('epochs')} epochs"
                                  + (f", {t.get('train_size')} images" if t.get("train_size") else "") + ")")
        teachers.append(f"any other set: {_join(specs)}")
    modes = get("label_mode")
    return (f"Each set trains {_join(get('num_models'))} fresh student(s) of {_join(archs)} from scratch on a "
            f"teacher's soft labels: KL divergence at temperature {_join(get('temperature'))} (× T²), AdamW lr "
            f"{_join(get('lr'))}, weight decay {_join(get('weight_decay'))}, cosine schedule, batch "
            f"{_join(get('batch_size'))}; every batch a random resized crop (area {scale}), {flip}, {mix}, "
            f"labelled by the teacher on exactly that batch (labels {_join(modes)}; stored labels are fp16 "
            f"logits replayed with their crops from a seed); epochs: {epochs or _join(get('epochs'))}; "
            f"teachers: {'; '.join(teachers) or '?'}; test accuracy on {_join(get('test_images'))} test images, "
            f"mean ± std over the students (pooled over seeds).")


def fmt_bytes(n: float | None) -> str:
    """``"7.8 KiB"``, ``"1.2 MiB"`` (binary units), ``"0"``, or "—"."""
    if n is None:
        return DASH
    if n < 1024:
        return f"{int(n)} B" if n else "0"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return DASH  # unreachable


def storage(cell: Cell) -> dict[str, Any]:
    """A soft-label cell's storage: image, label and teacher bytes (the largest over its records;
    label bytes 0 = labels computed online) and its teachers' test accuracies (percent)."""
    protos = [(r.get("eval") or {}).get("protocol") or {} for r in cell.records]

    def most(key: str) -> float | None:
        vals = [float(p[key]) for p in protos if _num(p.get(key)) is not None]
        return max(vals) if vals else None

    accs = _values(protos, lambda p: tuple(round(float(a), 2) for a in p.get("teacher_acc") or [] if _num(a) is not None)
                   or None)
    modes = _values(protos, lambda p: p.get("label_mode"))
    return {"image_bytes": most("image_bytes"), "label_bytes": most("label_bytes"),
            "teacher_bytes": most("teacher_bytes"), "teacher_acc": accs, "label_mode": modes}


def soft_accuracy_table(sec: Section) -> Table:
    """method x ipc under the soft-label protocol (no published columns: those are hard-label numbers)."""
    header = ["method"] + [f"ipc {k}" for k in sec.ipcs]
    rows = [["whole dataset"] + [fmt_acc(sec.whole) for _ in sec.ipcs]] if sec.whole is not None else []
    for label in sec.labels:
        rows.append([label] + [fmt_acc(sec.cell(label, k)) for k in sec.ipcs])
    return Table(header, rows)


def soft_score_table(sec: Section, ids: dict[str, str]) -> Table:
    """Scores per (method, ipc) under the soft-label protocol with what the set costs to keep:
    image bytes, label bytes (stored soft labels; 0: online, the teacher must be kept instead),
    teacher bytes and accuracy."""
    header = ["method", "ipc", "accuracy", "IOR ↑", "HLR ↓", "LRS ↑", "image bytes", "label bytes", "teacher bytes",
              "teacher acc", "distill (min)", "prepare (min)", "seeds", "machine"]
    rows = []
    for s in score_rows(sec):
        c: Cell = s["cell"]
        st = storage(c)
        labels = fmt_bytes(st["label_bytes"]) + (" (online)" if st["label_bytes"] == 0 else "")
        accs = "; ".join(", ".join(f"{a:.2f}" for a in t) for t in st["teacher_acc"]) or DASH
        rows.append([s["label"], str(s["ipc"]), fmt_acc(c), fmt_num(s["ior"], signed=True), fmt_num(s["hlr"]),
                     fmt_num(s["lrs"]), fmt_bytes(st["image_bytes"]), labels, fmt_bytes(st["teacher_bytes"]), accs,
                     fmt_num(s["minutes"], 1), fmt_num(s["prepare_minutes"], 1), ", ".join(map(str, c.seeds)),
                     record_machines(c.records, ids)])
    return Table(header, rows)


def _soft_section_blocks(sec: Section, figures_dir: Path, ids: dict[str, str]) -> list[object]:
    recs = [r for c in sec.cells.values() for r in c.records]
    arch = _join(_values(list(sec.cells.values()), lambda c: c.arch))
    blocks: list[object] = [
        Heading(2, sec.title),
        Paragraph(f"Test accuracy (%) of `{arch}` students under the soft-label protocol, budget `{sec.budget}` "
                  f"({len(recs)} result file(s); protocol: see Protocol above). Never compare these numbers with "
                  f"the hard-label tables: every set here learns from a teacher's labels."),
        Paragraph(f"Whole-data reference under this protocol: {fmt_acc(sec.whole)}." if sec.whole is not None else
                  f"No whole-data reference under this protocol (HLR and LRS show {DASH})."),
        Heading(3, "Accuracy"), soft_accuracy_table(sec),
        Heading(3, "DD-Ranking scores, storage and distillation time"), soft_score_table(sec, ids),
        Paragraph(f"IOR: improvement over the random subset of the same ipc under this same protocol and "
                  f"teacher (random + KD, a strong baseline: the gain over it is the number that matters); "
                  f"{SCORE_FORMULA}. image bytes: the set's float32 images; label bytes: the stored soft labels "
                  f"(fp16 logits per epoch and image; 0 (online): computed by the teacher during training, "
                  f"which must then be kept: teacher bytes, its float32 parameters); teacher acc: the teachers' "
                  f"test accuracy (%). distill / prepare (min): as in the hard-label tables."),
    ]
    tag = f"{_safe(sec.dataset)}-{_safe(sec.budget)}-soft"
    cells = list(sec.cells.values())
    figures_dir.mkdir(parents=True, exist_ok=True)
    p1 = plots.accuracy_vs_ipc(cells, sec.whole, f"{sec.title.replace('`', '')}: accuracy vs ipc",
                               figures_dir / f"acc_vs_ipc-{tag}.png", published=False)
    blocks += [Heading(3, "Figures"), Image(p1, "accuracy vs ipc", "Accuracy vs ipc (soft-label protocol).")]
    return blocks


def _section_blocks(sec: Section, figures_dir: Path, ids: dict[str, str]) -> list[object]:
    if sec.soft:
        return _soft_section_blocks(sec, figures_dir, ids)
    recs = [r for c in sec.cells.values() for r in c.records]
    arch = _join(_values(list(sec.cells.values()), lambda c: c.arch))
    blocks: list[object] = [
        Heading(2, sec.title),
        Paragraph(f"Test accuracy (%) of `{arch}` (the first evaluated architecture) under budget "
                  f"`{sec.budget}` ({len(recs)} result file(s); evaluation protocol: see Protocol above)."),
    ]
    if sec.whole is not None:
        which = (f"schedule `{sec.whole.key.budget}`, declared by its record as the reference for budget "
                 f"`{sec.budget}`" if sec.whole_declared else "same budget")
        blocks.append(Paragraph(f"Whole-data reference ({which}): {fmt_acc(sec.whole)} — "
                                + protocol_text(sec.whole.records)))
    else:
        others = ", ".join(f"`{w.key.budget}`: {fmt_acc(w)}" for w in sec.other_whole)
        blocks.append(Paragraph(f"No whole-data reference under budget `{sec.budget}` (HLR and LRS show "
                                f"{DASH})" + (f"; other budgets, not mixed in: {others}." if others else ".")
                                + f" Produce one with `python benchmarks/whole_data.py --tag {sec.budget} ...`."))
    blocks += [Heading(3, "Accuracy: ours vs published"), accuracy_table(sec),
               Paragraph(f"Published columns: {PUBLISHED_SOURCE}. {DASH}: no result."),
               Heading(3, "DD-Ranking scores and distillation time"), score_table(sec, ids),
               Paragraph(f"HLR: hard-label recovery, IOR: improvement over the random subset of the same ipc "
                         f"and budget, LRS: label-robust score (w = {LRS_WEIGHT}); {SCORE_FORMULA}. "
                         f"distill (min): distillation wall-clock minutes from the records' `distill.wall_s` "
                         f"(mean over seeds) on the machine(s) of the last column (ids: see Machines and code "
                         f"above; a wall-clock budget reaches more iterations on a faster machine); evaluation "
                         f"time excluded. prepare (min): the time spent obtaining teachers or expert "
                         f"trajectories before the distillation clock started (`prepare.wall_s`; the longest "
                         f"over the seeds, i.e. the cold run that trained them where one did; later runs load "
                         f"them from the cache), {DASH} for methods and records without a prepare phase; a "
                         f"cold run costs distill + prepare.")]
    tag = f"{_safe(sec.dataset)}-{_safe(sec.budget)}"
    cells = list(sec.cells.values())
    figures_dir.mkdir(parents=True, exist_ok=True)
    blocks.append(Heading(3, "Figures"))
    p1 = plots.accuracy_vs_ipc(cells, sec.whole, f"{sec.title.replace('`', '')}: accuracy vs ipc",
                               figures_dir / f"acc_vs_ipc-{tag}.png")
    p2 = plots.accuracy_vs_time(cells, f"{sec.title.replace('`', '')}: accuracy vs distillation time",
                                figures_dir / f"acc_vs_time-{tag}.png")
    blocks += [Image(p1, "accuracy vs ipc", "Accuracy vs ipc (ours solid, published dashed)."),
               Image(p2, "accuracy vs distillation minutes", "Accuracy vs distillation minutes (labels: ipc).")]
    previews = []
    for label in sec.labels:
        for k in sec.ipcs:
            cell = sec.cell(label, k)
            if cell is None:
                continue
            dest = plots.copy_preview(cell, figures_dir / f"preview-{tag}-{_safe(label)}-ipc{k}.png")
            if dest is not None:
                previews.append(Image(dest, f"{label} ipc {k}", f"{label}, ipc {k}"))
    if previews:
        blocks += [Heading(3, "Synthetic images"), *previews]
    return blocks


def build_document(results: Results, figures_dir: Path, command: str) -> Document:
    """The whole leaderboard as a :class:`Document` (figures are written to ``figures_dir``)."""
    doc = Document("condense leaderboard")
    cells = aggregate(results.accuracy)
    secs = sections(cells)
    doc.add(Comment("GENERATED FILE — do not edit by hand; regenerate with the command below."),
            Heading(1, "condense leaderboard"),
            Paragraph("**Generated file — do not edit.** Every number below is computed from the result files "
                      "(published numbers excepted). Regenerate with:"),
            Code(command),
            Heading(2, "Protocol"))
    by_budget: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results.accuracy:
        if r["method"] != WHOLE:
            by_budget[(r["budget"], record_protocol(r))].append(r)
    for (budget, protocol), recs in sorted(by_budget.items()):
        if protocol == SOFT:
            doc.add(Paragraph(f"Budget `{budget}`, soft-label protocol: " + soft_protocol_text(recs)))
        else:
            doc.add(Paragraph(f"Budget `{budget}`: " + protocol_text(recs)))
    if not by_budget:
        doc.add(Paragraph("No accuracy results yet."))
    doc.add(Paragraph("Accuracy cells read `mean ± std (n)`: n = number of fresh evaluation models (pooled "
                      "over seeds). Results of different budgets are never mixed in one table; a score needs "
                      f"its references (whole data, random subset) under the same budget, else it shows {DASH}."
                      + (" Soft-label protocol results (a teacher's labels) have their own sections, never mixed "
                         "with hard-label ones." if any(k[1] == SOFT for k in by_budget) else "")))
    ids = machine_ids(results.accuracy + results.ablation + results.perf)
    doc.add(Heading(2, "Machines and code"),
            *[Paragraph(t) for t in machine_lines(results.accuracy + results.ablation + results.perf, ids)
              or ["No records."]])
    for sec in secs:
        doc.add(*_section_blocks(sec, figures_dir, ids))
    if results.ablation:
        doc.add(Heading(2, "Ablations"),
                Paragraph("Tagged variant runs (e.g. fp32 instead of the budget's bf16): the settings that "
                          "differ from the budget's own record of the cell (same seed), and that record's "
                          "result beside (its iterations and machine: compare like with like)."),
                ablation_table(results.ablation, ids, results.accuracy))
    doc.add(Heading(2, "Speed"))
    if results.perf:
        doc.add(speed_table(results.perf, ids),
                Paragraph("ratio: baseline_s / ours_s as recorded by each perf benchmark (above 1 means ours is "
                          "faster), one column per measured variant of ours (bf16 autocast, torch.compile, both) "
                          "against the same fp32 baseline; ours and the baseline timed alternately in one "
                          "process, medians of several repeats."))
    else:
        doc.add(Paragraph("No perf records."))
    if results.study:
        doc.add(Heading(2, "Studies"), study_table(results.study))
    if results.skipped:
        doc.add(Heading(2, "Files skipped"),
                Table(["file", "reason"], [[str(p), why] for p, why in results.skipped], align="ll"))
    return doc


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling + ``os.replace`` (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(results_dir: str | Path, out: str | Path, html: str | Path | None = None,
                 figures_dir: str | Path | None = None, command: str | None = None,
                 allow_dirty: bool = False) -> list[Path]:
    """Render the leaderboard.

    Args:
        results_dir: folder of result JSON files (searched recursively).
        out: Markdown file to write.
        html: self-contained HTML file to write (``None``: none).
        figures_dir: where PNGs go (default: ``<out's folder>/figures``).
        command: the command line printed as "regenerate with" (default: the condense-report call).
        allow_dirty: include records written from a working tree with uncommitted changes
            (``code_version.dirty: true``); by default they are refused before anything is written.

    Returns:
        The written files (Markdown, HTML if any, then figures).

    Raises:
        ConfigError: a record is dirty and ``allow_dirty`` is False (the message names the files).
    """
    out = Path(out)
    figures = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    command = command or (f"condense-report results_dir={results_dir} out={out}" + (f" html={html}" if html else "")
                          + (" allow_dirty=true" if allow_dirty else ""))
    results = load_results(results_dir)
    check_clean(results, allow_dirty)
    doc = build_document(results, figures, command)
    _write_text(out, render_markdown(doc, out.parent))
    written = [out]
    if html is not None:
        _write_text(Path(html), render_html(doc))
        written.append(Path(html))
    written += sorted({b.path for b in doc.blocks if isinstance(b, Image)})
    log.info("leaderboard: %d accuracy and %d perf records, %d skipped -> %s", len(results.accuracy),
             len(results.perf), len(results.skipped), out)
    return written
