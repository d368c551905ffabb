"""Soft-label protocol records get their own leaderboard sections (never a hard-label table), with
IOR against random + KD under the same protocol and the images' and labels' bytes on every row."""

from __future__ import annotations

from pathlib import Path

from condense.report import write_report
from condense.report.leaderboard import fmt_bytes
from condense.report.records import record_protocol
from tests.report.test_report import acc_text, put, record, row, tables_after


def soft_record(method: str, ipc: int, accs: list[float], *, budget: str = "cpu_soft", label_bytes: int = 0,
                source: str = "config") -> dict:
    rec = record(method, ipc, accs, budget=budget, epochs=300)
    rec["eval"]["protocol"] = {
        "protocol": "soft", "archs": ["convnet"], "num_models": len(accs), "epochs": 300, "lr": 0.001,
        "weight_decay": 0.01, "batch_size": 128, "temperature": 4.0, "labels": "soft (teacher)",
        "label_mode": "stored" if label_bytes else "online", "top_k": 10, "test_images": 10000,
        "augmentation": {"crop_scale": [0.25, 1.0], "flip": True, "cutmix_alpha": 1.0, "label_seed": 0},
        "teacher_source": source, "teacher_acc": [91.25],
        "teachers": [{"model": "convnet_bn", "epochs": 15, "train_size": 0, "test_acc": 91.25, "weight": 1.0}],
        "image_bytes": ipc * 10 * 28 * 28 * 4, "label_bytes": label_bytes, "teacher_bytes": 1_275_000}
    return rec


CPU = "## Fashion-MNIST — budget `cpu`"
CPU_SOFT_PROTOCOL = "## Fashion-MNIST — budget `cpu`, soft-label protocol"
CPU_SOFT = "## Fashion-MNIST — budget `cpu_soft`, soft-label protocol"


def test_soft_records_form_their_own_sections(tmp_path: Path) -> None:
    res = tmp_path / "results"
    put(res, record("random", 10, [72.0, 72.5, 71.5]))
    put(res, record("dm", 10, [80.0, 81.0, 82.0]))
    # the same budget name, evaluated under the soft protocol: must not land in the hard table
    soft_dm = soft_record("dm", 10, [86.0, 86.5, 87.0], budget="cpu")
    soft_dm["seed"] = 1  # another file beside the hard record
    put(res, soft_dm)
    put(res, soft_record("random", 10, [85.0, 85.0, 85.0], label_bytes=600_000))
    put(res, soft_record("sre2l", 10, [88.0, 88.5, 89.0], label_bytes=600_000, source="set"))
    assert record_protocol(soft_dm) == "soft" and record_protocol(record("dm", 1, [1.0])) == "hard"
    out = tmp_path / "LEADERBOARD.md"
    write_report(res, out)
    md = out.read_text()
    assert CPU in md.splitlines() and CPU_SOFT_PROTOCOL in md.splitlines() and CPU_SOFT in md.splitlines()
    hard = tables_after(md, CPU)
    assert row(hard[0], method="dm")["ipc 10"] == acc_text([80.0, 81.0, 82.0])  # not pooled with the soft one
    assert row(hard[1], method="dm")["IOR ↑"] == "+9.00"  # against the HARD random subset
    lone = tables_after(md, CPU_SOFT_PROTOCOL)
    assert row(lone[0], method="dm")["ipc 10"] == acc_text([86.0, 86.5, 87.0])
    assert row(lone[1], method="dm")["IOR ↑"] == "—"  # no random + KD under budget cpu: no score
    soft = tables_after(md, CPU_SOFT)
    assert "ipc 10 published" not in soft[0][0]  # published numbers are hard-label ones
    sre2l = row(soft[1], method="sre2l")
    assert sre2l["IOR ↑"] == "+3.50" and sre2l["HLR ↓"] == "—"  # against random + KD, same protocol
    assert sre2l["image bytes"] == fmt_bytes(10 * 10 * 28 * 28 * 4) == "306.2 KiB"
    assert sre2l["label bytes"] == "585.9 KiB" and sre2l["teacher acc"] == "91.25"
    assert row(lone[1], method="dm")["label bytes"] == "0 (online)"
    assert "Budget `cpu_soft`, soft-label protocol: Each set trains 3 fresh student(s)" in md
    assert "KL divergence at temperature 4.0" in md and "CutMix" in md


def test_fmt_bytes() -> None:
    assert [fmt_bytes(v) for v in (None, 0, 512, 2048, 3 << 20)] == ["—", "0", "512 B", "2.0 KiB", "3.0 MiB"]
