"""Leaderboard figures (matplotlib, Agg canvas; no pyplot global state, no display needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from condense.report.published import published_value
from condense.report.records import Cell, run_dir_of

_SAVE = {"dpi": 110, "metadata": {"Software": None}}


def _colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _new_figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def accuracy_vs_ipc(cells: list[Cell], whole: Cell | None, title: str, path: Path, published: bool = True) -> Path:
    """One line per method (ours solid with std bars; published dashed, same colour).

    Args:
        cells: the synthetic-set cells of one dataset x budget (whole-data excluded).
        whole: the whole-data cell of the same dataset x budget, drawn as a dotted line.
        title: axes title.
        path: PNG to write.
        published: draw the published numbers (hard-label protocols: not beside soft-label cells).
    """
    labels = sorted({c.key.label for c in cells})
    colors = _colors(labels)
    fig, ax = _new_figure()
    for lab in labels:
        mine = sorted((c for c in cells if c.key.label == lab), key=lambda c: c.key.ipc)
        xs = [c.key.ipc for c in mine]
        ax.errorbar(xs, [c.mean for c in mine], yerr=[c.std for c in mine], color=colors[lab], marker="o",
                    capsize=3, label=f"{lab}")
        pub = [(c.key.ipc, published_value(c.key.dataset, c.key.method, c.key.ipc, c.key.flip, c.key.variant)) for c in mine]
        pub = [(x, v.mean) for x, v in pub if v is not None]
        if pub and published:
            ax.plot([x for x, _ in pub], [y for _, y in pub], color=colors[lab], linestyle="--", marker="x",
                    alpha=0.8, label=f"{lab} (published)")
    if whole is not None:
        ax.axhline(whole.mean, color="0.4", linestyle=":", label="whole data")
    ipcs = sorted({c.key.ipc for c in cells})
    if ipcs and max(ipcs) / max(min(ipcs), 1) >= 5:
        ax.set_xscale("log")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    return _finish_accuracy_plot(fig, ax, "images per class", title, path)


def accuracy_vs_time(cells: list[Cell], title: str, path: Path) -> Path:
    """Accuracy against distillation wall-clock minutes; points labelled with their ipc."""
    labels = sorted({c.key.label for c in cells})
    colors = _colors(labels)
    fig, ax = _new_figure()
    for lab in labels:
        mine = sorted((c for c in cells if c.key.label == lab and c.distill_s is not None),
                      key=lambda c: c.key.ipc)
        if not mine:
            continue
        xs = [c.distill_s / 60.0 for c in mine]
        ys = [c.mean for c in mine]
        ax.plot(xs, ys, color=colors[lab], marker="o", linestyle="-", alpha=0.85, label=lab)
        for c, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(f"{c.key.ipc}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    return _finish_accuracy_plot(fig, ax, "distillation wall time (minutes)", title, path)


def _finish_accuracy_plot(fig, ax, xlabel: str, title: str, path: Path) -> Path:  # noqa: ANN001
    """Shared labels, grid, legend and save of the accuracy plots."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, **_SAVE)
    return path


def copy_preview(cell: Cell, dest: Path) -> Path | None:
    """Copy the first run's ``preview.png`` (from the run directory its record names) to ``dest``.

    When no run directory is left (a fresh clone: runs/ is not committed), a copy already at
    ``dest`` (the committed figure of an earlier build) is kept.

    Returns:
        ``dest``, or ``None`` when neither a run directory nor an earlier copy holds a preview.
    """
    for rec in cell.records:
        run_dir = run_dir_of(rec)
        if run_dir is not None and (run_dir / "preview.png").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "preview.png", dest)
            return dest
    return dest if dest.is_file() else None
