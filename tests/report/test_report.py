"""Leaderboard rendering from FABRICATED result files (no distillation, no torch work)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from condense.cli.report import run as report_cli
from condense.report import aggregate, load_results, lrs, write_report
from condense.report.records import pool, result_path

DASH = "—"


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)
    return path


def record(method: str, ipc: int | None, accs: list[float], *, flip: bool = False, budget: str = "cpu",
           seed: int = 0, wall_s: float = 60.0, iterations: int = 10, dataset: str = "fashion_mnist",
           run_dir: Path | None = None, epochs: int = 1000) -> dict:
    """A result record in the DESIGN.md format; summary = mean / population std of ``accs``."""
    runs = [{"arch": "convnet", "seed": seed * 1000 + i, "epochs": epochs, "lr": 0.01, "test_acc": a}
            for i, a in enumerate(accs)]
    rec = {
        "schema": 1, "kind": "accuracy", "method": method, "flip": flip, "dataset": dataset, "ipc": ipc,
        "budget": budget, "seed": seed, "config": {"method": {"name": method}},
        "code_version": {"git_sha": "0123456789abcdef", "dirty": False},
        "machine": {"cpu": "Fake CPU", "cores": 2, "torch": "2.14.1", "device": "cpu"},
        "distill": {"wall_s": wall_s, "iterations": iterations},
        "eval": {"protocol": {"archs": ["convnet"], "num_models": len(accs), "epochs": epochs, "lr": 0.01,
                              "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 256, "dsa": True,
                              "dsa_strategy": "color_crop_cutout_flip_scale_rotate", "test_images": 10000,
                              "labels": "hard", "learned_lr": None, "lr_selection": None},
                 "runs": runs,
                 "summary": {"convnet": {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs),
                                         "n": len(accs)}},
                 "wall_s": 1.0},
        "command": f"condense method={method} ipc={ipc}",
    }
    if run_dir is not None:
        rec["run_dir"] = str(run_dir)
    return rec


def put(results: Path, rec: dict) -> Path:
    if rec["method"] == "whole":
        path = results / rec["dataset"] / "whole" / f"{rec['budget']}-seed{rec['seed']}.json"
    else:
        path = result_path(results, rec["dataset"], rec["method"], rec["flip"], rec["ipc"], rec["budget"],
                           rec["seed"], variant=rec.get("variant", ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


DM10 = [80.0, 81.5, 79.9]
DM1 = [60.1, 61.2, 59.8]
DM50 = [85.0, 86.0, 85.5]
RANDOM1, RANDOM10, WHOLE = [50.0, 51.0, 49.0], [72.0, 72.5, 71.5], [91.0, 91.2, 90.8]
HERDING1_S0, HERDING1_S1 = [60.0, 61.0, 62.0], [58.0, 59.0, 60.0]


@pytest.fixture
def board(tmp_path: Path) -> dict:
    res = tmp_path / "results"
    preview_run = tmp_path / "runs" / "dsa_flip_run"
    _png(preview_run / "preview.png")
    put(res, record("whole", None, WHOLE, wall_s=0.0, iterations=0))
    put(res, record("random", 1, RANDOM1, wall_s=0.0, iterations=0))
    put(res, record("random", 10, RANDOM10, wall_s=0.0, iterations=0))
    dm1, dm10 = record("dm", 1, DM1, wall_s=120.0, iterations=400), record("dm", 10, DM10, wall_s=300.0, iterations=400)
    dm1["machine"]["gemm_gflops"] = {"start": 140.2, "end": 139.0}  # the speed probe (two records have it)
    dm10["machine"]["gemm_gflops"] = {"start": 95.4, "end": 60.0}
    put(res, dm1)
    put(res, dm10)
    put(res, record("dm", 50, DM50, wall_s=900.0, iterations=300, epochs=300))
    put(res, record("dsa", 10, [83.0, 84.0, 83.5], flip=True, wall_s=600.0, iterations=12, run_dir=preview_run))
    put(res, record("herding", 1, HERDING1_S0, seed=0))
    put(res, record("herding", 1, HERDING1_S1, seed=1))
    put(res, record("dm", 10, [40.0, 41.0, 42.0], budget="smoke", wall_s=2.0, epochs=10))  # other budget
    abl = record("dm", 10, [70.0, 70.5, 71.0], wall_s=500.0, iterations=250)  # an fp32 ablation of dm ipc 10
    abl.update(kind="ablation", tag="fp32", command="condense method=dm ipc=10 method.bf16=false tag=fp32")
    path = result_path(res, "fashion_mnist", "dm", False, 10, "cpu", 0, tag="fp32")
    path.write_text(json.dumps(abl))
    perf = res / "perf" / "dm_iteration.json"
    perf.parent.mkdir(parents=True, exist_ok=True)
    perf.write_text(json.dumps({"schema": 1, "kind": "perf", "name": "dm_iteration_quick", "ours_s": 9.68,
                                "baseline_s": 11.87, "ratio": 1.2255, "baseline": "per-class loop (main_DM.py)",
                                "variants": {"ours": {"ratio": 1.2255}, "ours_bf16": {"ratio": 1.8554},
                                             "ours_compile_bf16": {"ratio": 2.7538}},
                                "machine": {"device": "cpu"}, "command": "python x.py"}))
    (res / "perf" / "gm.json").write_text(json.dumps({
        "schema": 1, "kind": "perf", "name": "gm_step", "ours_s": 1.8, "baseline_s": 2.0, "ratio": 1.125,
        "variants": {"ours": {"ratio": 1.125}, "ours_bf16": {"ratio": 1.7449}, "ours_compile": {"ratio": 1.3219}},
        "machine": {"device": "cpu", "cpu": "Xeon X", "cores": 2, "cpu_isa": "AVX512+AMX", "bf16_speedup": 1.734}}))
    (res / "perf" / "eval_bf16.json").write_text(json.dumps({
        "schema": 1, "kind": "study", "name": "eval_bf16", "question": "bf16 in evaluation training",
        "set": "random ipc10", "fp32": {"summary": {"convnet": {"mean": 75.4067, "std": 0.2223, "n": 3}}},
        "bf16": {"summary": {"convnet": {"mean": 75.3667, "std": 0.205, "n": 3}}}, "accuracy_delta_points": -0.04}))
    (res / "fashion_mnist" / "dm" / "ipc1-broken-seed0.json").write_text("{not json")
    out = tmp_path / "site" / "LEADERBOARD.md"
    html = tmp_path / "site" / "leaderboard.html"
    written = write_report(res, out, html)
    return {"res": res, "out": out, "html": html, "md": out.read_text(), "written": written}


def tables_after(md: str, heading: str) -> list[list[dict[str, str]]]:
    """Every Markdown table between ``heading`` and the next heading of the same or higher level."""
    lines = md.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    tables, cur = [], []
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        if line.startswith("|"):
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return [[dict(zip(t[0], row, strict=True)) for row in t[2:]] for t in tables]


def row(table: list[dict[str, str]], **match: str) -> dict[str, str]:
    hits = [r for r in table if all(r.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, table)
    return hits[0]


def acc_text(accs: list[float]) -> str:
    return f"{statistics.fmean(accs):.2f} ± {statistics.pstdev(accs):.2f} ({len(accs)})"


def lrs_ref(h: float, i: float) -> float:
    alpha = 0.5 * i / 100 - 0.5 * h / 100
    return (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1)) * 100


CPU = "## Fashion-MNIST — budget `cpu`"
SMOKE = "## Fashion-MNIST — budget `smoke`"


def test_accuracy_cells_and_published(board: dict) -> None:
    acc, scores = tables_after(board["md"], CPU)
    dm = row(acc, method="dm")
    assert dm["ipc 10"] == acc_text(DM10)
    assert dm["ipc 1"] == acc_text(DM1)
    assert dm["ipc 10 published"] == "83.5 ± 0.3"
    assert dm["ipc 50 published"] == "88.1 ± 0.6"
    assert row(acc, method="random")["ipc 1 published"] == "51.4"
    assert row(acc, method="random")["ipc 10"] == acc_text(RANDOM10)
    flip = row(acc, method="dsa+flip")
    assert flip["ipc 10"] == acc_text([83.0, 84.0, 83.5])
    assert flip["ipc 10 published"] == DASH and flip["ipc 1"] == DASH
    whole = row(acc, method="whole dataset")
    assert whole["ipc 1"] == acc_text(WHOLE) and whole["ipc 1 published"] == "93.5"
    # methods we did not run still show their published numbers
    assert row(acc, method="DC (published only)")["ipc 10 published"] == "82.3 ± 0.4"
    # two seeds pool into one cell: all 6 model accuracies
    assert row(acc, method="herding")["ipc 1"] == acc_text(HERDING1_S0 + HERDING1_S1)


def test_budgets_never_mix(board: dict) -> None:
    acc, scores = tables_after(board["md"], CPU)
    assert row(acc, method="dm")["ipc 10"] == acc_text(DM10)
    s_acc, s_scores = tables_after(board["md"], SMOKE)
    assert row(s_acc, method="dm")["ipc 10"] == acc_text([40.0, 41.0, 42.0])
    smoke = row(s_scores, method="dm", ipc="10")
    assert smoke["HLR ↓"] == DASH and smoke["IOR ↑"] == DASH and smoke["LRS ↑"] == DASH


def test_scores_and_time(board: dict) -> None:
    _, scores = tables_after(board["md"], CPU)
    m, r, w = statistics.fmean(DM10), statistics.fmean(RANDOM10), statistics.fmean(WHOLE)
    dm10 = row(scores, method="dm", ipc="10")
    assert dm10["HLR ↓"] == f"{w - m:.2f}"
    assert dm10["IOR ↑"] == f"{m - r:+.2f}"
    assert dm10["LRS ↑"] == f"{lrs_ref(w - m, m - r):.2f}"
    assert dm10["distill (min)"] == "5.0" and dm10["iterations"] == "400"
    dm50 = row(scores, method="dm", ipc="50")  # no random subset at ipc 50
    assert dm50["IOR ↑"] == DASH and dm50["LRS ↑"] == DASH
    assert dm50["HLR ↓"] == f"{w - statistics.fmean(DM50):.2f}"
    assert row(scores, method="random", ipc="1")["IOR ↑"] == "+0.00"
    assert "LRS = (e^alpha - e^-1) / (e - e^-1)" in board["md"]


def test_header_protocol_machine_speed_and_skipped(board: dict) -> None:
    md = board["md"]
    assert md.startswith("<!-- GENERATED FILE")
    assert "condense-report results_dir=" in md
    assert "Budget `cpu`: Each set trains 3 fresh model(s) of convnet" in md
    assert "1000 at ipc 1" in md and "300 at ipc 50" in md and "DSA augmentation during training" in md
    assert "Fake CPU, 2 cores" in md and "Code versions (record count): `0123456789` (" in md
    assert "`machine.gemm_gflops`) at the start of 2 of them: 95–140 GFLOP/s." in md
    speed = tables_after(md, "## Speed")[0]
    dm = row(speed, name="dm_iteration_quick")
    assert (dm["fp32 ratio"], dm["bf16 ratio"], dm["compile ratio"], dm["compile+bf16 ratio"]) == (
        "1.23×", "1.86×", DASH, "2.75×")
    gm = row(speed, name="gm_step")
    assert (gm["fp32 ratio"], gm["bf16 ratio"], gm["compile ratio"], gm["compile+bf16 ratio"]) == (
        "1.12×", "1.74×", "1.32×", DASH)
    assert gm["CPU"] == "Xeon X, 2 cores, AVX512+AMX, bf16 probe 1.73×" and dm["CPU"] == DASH
    gm_id = re.search(r"^(M\d+): Xeon X, 2 cores, AVX512\+AMX, device cpu — 1 record\(s\)\.$", md, re.M)
    dm_id = re.search(r"^(M\d+): device cpu — 1 record\(s\)\.$", md, re.M)
    assert gm_id and dm_id and gm["machine"] == gm_id.group(1) and dm["machine"] == dm_id.group(1)
    assert gm["machine"] != dm["machine"]
    study = row(tables_after(md, "## Studies")[0], name="eval_bf16")
    assert study["arms"] == "fp32: convnet: 75.41 ± 0.22 (3) / bf16: convnet: 75.37 ± 0.20 (3)"
    assert study["delta (points)"] == "-0.04"
    assert "ipc1-broken-seed0.json" in md  # unparsable file listed, not fatal


def test_figures_written(board: dict) -> None:
    figs = board["out"].parent / "figures"
    for name in ("acc_vs_ipc-fashion_mnist-cpu.png", "acc_vs_time-fashion_mnist-cpu.png",
                 "acc_vs_ipc-fashion_mnist-smoke.png", "preview-fashion_mnist-cpu-dsa+flip-ipc10.png"):
        assert (figs / name).stat().st_size > 0, name
        assert f"(figures/{name})" in board["md"]
    assert not (figs / "preview-fashion_mnist-cpu-dm-ipc10.png").exists()  # its record names no run dir


def test_html_self_contained(board: dict) -> None:
    page = board["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    srcs = re.findall(r"""<img[^>]*\ssrc="([^"]*)\"""", page)
    assert len(srcs) == board["md"].count("](figures/") == 5  # 2 plots x 2 budgets + 1 preview
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert acc_text(DM10) in page and "<style>" in page


def test_scores_bounds_and_pool() -> None:
    assert lrs(100.0, -100.0) == pytest.approx(0.0, abs=1e-9)
    assert lrs(-100.0, 100.0) == pytest.approx(100.0)
    assert lrs(0.0, 0.0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)) * 100)
    assert lrs(None, 1.0) is None
    a, b = [1.0, 2.0, 3.0], [10.0, 11.0]
    m, s, n = pool([(statistics.fmean(a), statistics.pstdev(a), 3), (statistics.fmean(b), statistics.pstdev(b), 2)])
    assert n == 5 and m == pytest.approx(statistics.fmean(a + b)) and s == pytest.approx(statistics.pstdev(a + b))


def test_load_and_aggregate_keys(board: dict) -> None:
    res = load_results(board["res"])
    assert len(res.perf) == 2 and len(res.study) == 1 and len(res.skipped) == 1
    cells = aggregate(res.accuracy)
    labels = {(k.budget, k.label, k.ipc) for k in cells}
    assert ("cpu", "dsa+flip", 10) in labels and ("cpu", "whole", None) in labels


def test_report_cli(tmp_path: Path, board: dict, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli" / "LB.md"
    assert report_cli([f"results_dir={board['res']}", f"out={out}", "html=null"]) == 0
    assert out.exists() and not (tmp_path / "cli" / "leaderboard.html").exists()
    assert (tmp_path / "cli" / "figures" / "acc_vs_ipc-fashion_mnist-cpu.png").exists()
    assert report_cli(["bogus=1"]) == 2
    assert "unknown argument 'bogus'" in capsys.readouterr().err


def test_ablation_listed_not_pooled(board: dict) -> None:
    """A tagged (ablation) record gets its own table and never enters the leaderboard cell."""
    (table,) = tables_after(board["md"], "## Ablations")[:1]
    r = row(table, tag="fp32")
    assert (r["method"], r["ipc"], r["changed"], r["distill s"], r["iterations"]) == (
        "dm", "10", "method.bf16=false", "500", "250")
    assert r["accuracy"] == "convnet: 70.50 ± 0.41 (3)"
    assert acc_text(DM10) in board["md"]  # the dm ipc 10 cell is still the budget's own run


def test_whole_reference_declared_for_a_budget(tmp_path):
    """A whole-data run on its own schedule is the reference of exactly the budgets it declares."""
    from condense.report.leaderboard import score_rows, sections

    res = tmp_path / "results"
    declared = record("whole", None, WHOLE, budget="e5", wall_s=0.0, iterations=0)
    declared["reference_for"] = ["cpu"]
    put(res, declared)
    put(res, record("whole", None, [80.0, 80.0, 80.0], budget="e3", wall_s=0.0, iterations=0))  # declares none
    put(res, record("dm", 10, DM10, wall_s=300.0, iterations=400))
    put(res, record("dm", 10, [40.0, 41.0, 42.0], budget="smoke", wall_s=2.0, epochs=10))
    secs = {s.budget: s for s in sections(aggregate(load_results(res).accuracy))}
    cpu, smoke = secs["cpu"], secs["smoke"]
    assert cpu.whole is not None and cpu.whole.key.budget == "e5" and cpu.whole_declared
    assert {w.key.budget for w in cpu.other_whole} == {"e3"}
    (row,) = score_rows(cpu)
    assert row["hlr"] == pytest.approx(statistics.fmean(WHOLE) - statistics.fmean(DM10))
    assert smoke.whole is None and score_rows(smoke)[0]["hlr"] is None  # not declared for smoke
    md = tmp_path / "LEADERBOARD.md"
    write_report(res, md)
    assert "schedule `e5`, declared by its record as the reference for budget `cpu`" in md.read_text()


def test_several_declared_references_the_longest_trained_wins(tmp_path):
    """The cheap 5-epoch reference and a converged one both declare budget cpu: HLR uses the
    converged one, the cheap one is listed under its own name."""
    from condense.report.leaderboard import sections

    res = tmp_path / "results"
    for budget, epochs, accs in (("e5", 5, [90.8, 90.8, 90.9]), ("converged", 20, [93.0, 93.1])):
        r = record("whole", None, accs, budget=budget, wall_s=0.0, iterations=0, epochs=epochs)
        r["reference_for"] = ["cpu"]
        put(res, r)
    put(res, record("dm", 10, DM10, wall_s=300.0, iterations=400))
    (cpu,) = sections(aggregate(load_results(res).accuracy))
    assert cpu.whole.key.budget == "converged" and [w.key.budget for w in cpu.other_whole] == ["e5"]


def test_variant_rows_are_their_own_cells(tmp_path):
    """A multi-formation / learned-label run is a row of its own (``<method>+<variant>``), next to
    the plain method's, with no published number borrowed from the plain method."""
    from condense.report.leaderboard import accuracy_table, sections

    res = tmp_path / "results"
    put(res, record("dm", 1, DM1, wall_s=900.0, iterations=1000))
    multi = record("dm", 1, [75.0, 76.0, 77.0], wall_s=900.0, iterations=800)
    multi["variant"] = "multi2"
    put(res, multi)
    assert (res / "fashion_mnist" / "dm+multi2" / "ipc1-cpu-seed0.json").exists()
    (cpu,) = sections(aggregate(load_results(res).accuracy))
    assert cpu.labels == ["dm", "dm+multi2"]
    assert cpu.cell("dm+multi2", 1).mean == pytest.approx(76.0) and cpu.cell("dm", 1).mean != pytest.approx(76.0)
    rows = {r[0]: r for r in accuracy_table(cpu).rows}
    assert rows["dm+multi2"][2] == "—" and rows["dm"][2] != "—"  # published: only the plain method's


def test_machine_ids_per_cell(tmp_path: Path) -> None:
    """Records of two machines with the same CPU name but another ISA get distinct ids, and each
    score / ablation row names the machine its wall-clock figures come from."""
    res = tmp_path / "results"
    put(res, record("random", 1, RANDOM1, wall_s=0.0, iterations=0))
    put(res, record("random", 10, RANDOM10, wall_s=0.0, iterations=0))
    put(res, record("dm", 1, DM1, wall_s=900.0, iterations=1391))
    fast = record("dm", 10, DM10, wall_s=900.0, iterations=4000)
    fast["machine"]["cpu_isa"] = "AVX512+AVX512_BF16"
    put(res, fast)
    abl = record("dm", 10, [70.0, 70.5, 71.0], wall_s=900.0, iterations=2500)
    abl["machine"]["cpu_isa"] = "AVX512+AVX512_BF16"
    abl.update(kind="ablation", tag="fp32", command="condense method=dm ipc=10 method.bf16=false tag=fp32")
    result_path(res, "fashion_mnist", "dm", False, 10, "cpu", 0, tag="fp32").write_text(json.dumps(abl))
    out = tmp_path / "LEADERBOARD.md"
    write_report(res, out)
    md = out.read_text()
    # three records on the plain machine (random 1 and 10, dm 1) -> M1; two on the AVX-512 BF16 one -> M2
    assert "M1: Fake CPU, 2 cores, device cpu, torch 2.14.1 — 3 record(s)." in md
    assert "M2: Fake CPU, 2 cores, AVX512+AVX512_BF16, device cpu, torch 2.14.1 — 2 record(s)." in md
    _, scores = tables_after(md, CPU)
    assert row(scores, method="dm", ipc="1")["machine"] == "M1"
    assert row(scores, method="dm", ipc="10")["machine"] == "M2"
    assert row(tables_after(md, "## Ablations")[0], tag="fp32")["machine"] == "M2"


def test_ablation_changes_against_the_cell_record(tmp_path: Path) -> None:
    """An ablation's "changed" text is the difference of its method settings from the budget cell's
    record (so it stays true after the budget itself changes), with the cell's result beside; an
    ablation without a cell record falls back to its command's overrides."""
    res = tmp_path / "results"
    cell = record("dsa", 1, [70.0, 71.0, 72.0], wall_s=900.0, iterations=700)
    cell["method_config"] = {"iterations": 1000, "batch_real": 256, "bf16": True, "init": "herding"}
    cell["distill"]["iterations_planned"] = 1000
    put(res, cell)
    abl = record("dsa", 1, [69.0, 70.0, 71.0], wall_s=640.0, iterations=1000)
    # the record of a run made when the budget's batch was 128: its command names only bf16
    abl.update(kind="ablation", tag="fp32", command="condense method=dsa ipc=1 method.bf16=false tag=fp32",
               method_config={"iterations": 1000, "batch_real": 128, "bf16": False, "init": "herding"})
    abl["distill"]["iterations_planned"] = 1400
    result_path(res, "fashion_mnist", "dsa", False, 1, "cpu", 0, tag="fp32").write_text(json.dumps(abl))
    orphan = record("dm", 10, [70.0, 70.5, 71.0], wall_s=900.0, iterations=2500)  # no dm ipc 10 cell
    orphan.update(kind="ablation", tag="fp32", command="condense method=dm ipc=10 method.bf16=false tag=fp32",
                  method_config={"bf16": False})
    path = result_path(res, "fashion_mnist", "dm", False, 10, "cpu", 0, tag="fp32")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(orphan))
    out = tmp_path / "LEADERBOARD.md"
    write_report(res, out)
    (table,) = tables_after(out.read_text(), "## Ablations")[:1]
    r = row(table, method="dsa", tag="fp32")
    assert r["changed"] == "batch_real=128 (cell: 256) bf16=False (cell: True) iterations cap=1400 (cell: 1000)"
    assert r["budget cell"] == "71.00 ± 0.82 (700 it., M1)"
    r = row(table, method="dm", tag="fp32")
    assert (r["changed"], r["budget cell"]) == ("method.bf16=false", "—")


def test_prepare_minutes_beside_distill(tmp_path: Path, board: dict) -> None:
    """Records with a ``prepare`` block show its (cold, i.e. longest) minutes; older records show —."""
    _, scores = tables_after(board["md"], CPU)
    old = row(scores, method="dm", ipc="10")  # written before the prepare phase existed
    assert old["distill (min)"] == "5.0" and old["prepare (min)"] == DASH
    res = tmp_path / "prep"
    cold = record("dm", 10, DM10, seed=0, wall_s=300.0)
    cold["prepare"] = {"wall_s": 1800.0}  # trained the teachers
    warm = record("dm", 10, DM10, seed=1, wall_s=360.0)
    warm["prepare"] = {"wall_s": 6.0}  # loaded them from the cache
    put(res, cold)
    put(res, warm)
    put(res, record("random", 10, RANDOM10, wall_s=0.0, iterations=0))
    abl = record("dm", 10, [70.0, 70.5, 71.0], wall_s=500.0, iterations=250)
    abl.update(kind="ablation", tag="fp32", prepare={"wall_s": 120.0})
    path = result_path(res, "fashion_mnist", "dm", False, 10, "cpu", 0, tag="fp32")
    path.write_text(json.dumps(abl))
    out = tmp_path / "prep.md"
    write_report(res, out)
    md = out.read_text()
    _, scores = tables_after(md, CPU)
    dm = row(scores, method="dm", ipc="10")
    assert (dm["distill (min)"], dm["prepare (min)"], dm["seeds"]) == ("5.5", "30.0", "0, 1")
    assert row(scores, method="random", ipc="10")["prepare (min)"] == DASH
    (table,) = tables_after(md, "## Ablations")[:1]
    assert row(table, tag="fp32")["prepare s"] == "120"
    assert "prepare (min): the time spent obtaining teachers" in md
