"""Published accuracies the leaderboard prints beside ours (hand-entered, never measured here).

Source: METHODS.md, "Published Fashion-MNIST results" (ConvNet-3, hard labels, test accuracy in
percent). Each entry keeps the note METHODS.md attaches to it. Values are what the papers print;
they were obtained under each paper's own protocol (DC/DSA: 5 experiments x 20 models, 1000 or
300 evaluation epochs), not under our ``cpu`` budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCE = ("METHODS.md \"Published Fashion-MNIST results\" (ConvNet-3, hard labels), figures read from "
          "the methods' papers; each paper's own evaluation protocol, not ours")


@dataclass(frozen=True)
class PublishedValue:
    """One published number: ``mean`` (and ``std`` when the paper prints one), in percent."""

    mean: float
    std: float | None = None

    def text(self) -> str:
        """``"82.3 ± 0.4"`` or ``"71.1"``."""
        return f"{self.mean:.1f}" if self.std is None else f"{self.mean:.1f} ± {self.std:.1f}"


@dataclass(frozen=True)
class PublishedRow:
    """A method's published results on one dataset, keyed by ipc (``None`` = whole data)."""

    method: str  # our registry key where we implement it, else a descriptive name
    label: str  # how the paper names it
    values: dict[int | None, PublishedValue] = field(default_factory=dict)
    note: str = ""


def _v(mean: float, std: float | None = None) -> PublishedValue:
    return PublishedValue(mean, std)


FASHION_MNIST: tuple[PublishedRow, ...] = (
    PublishedRow("whole", "whole dataset", {None: _v(93.5)}),
    PublishedRow("random", "random", {1: _v(51.4), 10: _v(73.8), 50: _v(82.5)},
                 "DC paper table, not re-checked"),
    PublishedRow("herding", "herding", {1: _v(67.0), 10: _v(71.1), 50: _v(71.9)},
                 "DC paper table, not re-checked"),
    PublishedRow("dc", "DC", {1: _v(70.5, 0.6), 10: _v(82.3, 0.4), 50: _v(83.6, 0.4)}),
    PublishedRow("dsa", "DSA", {1: _v(70.6, 0.6), 10: _v(84.6, 0.3), 50: _v(88.7, 0.2)}),
    PublishedRow("dm", "DM", {1: _v(70.7, 0.6), 10: _v(83.5, 0.3), 50: _v(88.1, 0.6)},
                 "later paper's re-run, not re-checked"),
    PublishedRow("kip", "KIP images -> trained ConvNet", {1: _v(73.8), 10: _v(86.8), 50: _v(87.8)}),
    PublishedRow("idc", "IDC", {1: _v(81.0), 10: _v(86.0), 50: _v(86.2)},
                 "IDC-I 70.7 / 85.3 / 89.1"),
    PublishedRow("frepo", "FRePo", {1: _v(75.6), 10: _v(86.2), 50: _v(89.6)},
                 "BN ConvNet, learned labels"),
)

PUBLISHED: dict[str, tuple[PublishedRow, ...]] = {"fashion_mnist": FASHION_MNIST}


def published_rows(dataset: str) -> tuple[PublishedRow, ...]:
    """Every published row for ``dataset`` (empty when none is on file)."""
    return PUBLISHED.get(dataset, ())


def published_value(dataset: str, method: str, ipc: int | None, flip: bool = False,
                    variant: str = "") -> PublishedValue | None:
    """The published number for (dataset, method, ipc); ``None`` when there is none.

    FYI-flip variants have no published Fashion-MNIST figures, so ``flip=True`` always gives ``None``;
    nor do our variants of a method (``variant``: multi-formation, learned labels).
    """
    if flip or variant:
        return None
    for row in published_rows(dataset):
        if row.method == method:
            return row.values.get(ipc)
    return None
