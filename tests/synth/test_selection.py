"""Herding and k-center selection against brute-force definitions on tiny point sets.

The references below are written from the definitions in plain Python (lists, ``math``), not from
the implementation: herding picks, at every step, the unchosen point that brings the mean of the
chosen points closest to the mean of all points; greedy k-center starts at the point nearest the
mean and then repeatedly adds the point farthest from everything chosen so far. Ties go to the
lowest index in both (``torch.argmin`` / ``argmax`` return the first extremum).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from condense.synth.selection import herding_select, kcenter_select


def points(n: int, d: int, seed: int) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).tolist()


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(math.fsum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def mean(rows: list[list[float]]) -> list[float]:
    return [math.fsum(col) / len(rows) for col in zip(*rows, strict=True)]


def herding_reference(pts: list[list[float]], k: int) -> list[int]:
    """Each step: the unchosen index minimizing ||mean(chosen + [candidate]) - mu||, by enumeration."""
    mu, chosen = mean(pts), []
    for _ in range(k):
        scores = {i: dist(mean([pts[j] for j in chosen] + [pts[i]]), mu) for i in range(len(pts)) if i not in chosen}
        chosen.append(min(scores, key=lambda i: (scores[i], i)))
    return chosen


def kcenter_reference(pts: list[list[float]], k: int) -> list[int]:
    """First the point nearest the mean, then repeatedly the point farthest from the chosen ones."""
    mu = mean(pts)
    chosen = [min(range(len(pts)), key=lambda i: (dist(pts[i], mu), i))]
    while len(chosen) < k:
        gap = {i: min(dist(pts[i], pts[c]) for c in chosen) for i in range(len(pts))}
        chosen.append(max(gap, key=lambda i: (gap[i], -i)))
    return chosen


def radius(pts: list[list[float]], centers: list[int]) -> float:
    """Covering radius: the largest distance from a point to its nearest center."""
    return max(min(dist(p, pts[c]) for c in centers) for p in pts)


def min_gap(pts: list[list[float]], chosen: list[int], score) -> float:  # noqa: ANN001
    """Smallest difference between the best and second-best score over the steps (near-ties make a
    float comparison of two exact procedures meaningless, so the tests check they are far apart)."""
    gaps = []
    for t in range(len(chosen)):
        vals = sorted(score(chosen[:t], i) for i in range(len(pts)) if i not in chosen[:t])
        if len(vals) > 1:
            gaps.append(vals[1] - vals[0])
    return min(gaps) if gaps else math.inf


SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_herding_is_the_greedy_mean_matching_sequence(seed: int, dtype: torch.dtype) -> None:
    pts = points(9, 3, seed)
    k = 6
    want = herding_reference(pts, k)
    mu = mean(pts)
    gap = min_gap(pts, want, lambda ch, i: dist(mean([pts[j] for j in ch] + [pts[i]]), mu))
    if dtype is torch.float32 and gap < 1e-4:
        pytest.skip("near-tie: float32 cannot be held to the float64 order")
    got = herding_select(torch.tensor(pts, dtype=dtype), k)
    assert got.dtype == torch.int64 and got.tolist() == want


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kcenter_is_the_greedy_farthest_point_sequence(seed: int, dtype: torch.dtype) -> None:
    pts = points(9, 2, seed)
    k = 5
    want = kcenter_reference(pts, k)
    got = kcenter_select(torch.tensor(pts, dtype=dtype), k)
    assert got.dtype == torch.int64 and got.tolist() == want


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_kcenter_radius_within_twice_the_optimum(seed: int, k: int) -> None:
    """Greedy farthest-point is a 2-approximation of the optimal covering radius (found here by
    trying every k-subset of 10 points), and it is never better than the optimum."""
    pts = points(10, 2, 100 + seed)
    opt = min(radius(pts, list(s)) for s in itertools.combinations(range(len(pts)), k))
    got = radius(pts, kcenter_select(torch.tensor(pts), k).tolist())
    assert opt - 1e-12 <= got <= 2 * opt + 1e-12


def test_herding_hand_example() -> None:
    """1-D points 0, 1, 2, 10 (mean 3.25): 2 is nearest the mean; then the running mean with 1 is 1.5
    (1.75 away) against 1 with 0 and 6 with 10 (2.25, 2.75), so 1; then (3 + 10) / 3 = 4.33 (1.08
    away) beats (3 + 0) / 3 = 1 (2.25 away), so 10; then 0."""
    got = herding_select(torch.tensor([[0.0], [1.0], [2.0], [10.0]]), 4).tolist()
    assert got == [2, 1, 3, 0]


def test_kcenter_hand_example() -> None:
    """1-D points 0, 1, 2, 10 (mean 3.25): start at 2, then the farthest is 10, then 0 (2 from 2)."""
    assert kcenter_select(torch.tensor([[0.0], [1.0], [2.0], [10.0]]), 3).tolist() == [2, 3, 0]


def test_herding_never_repeats_a_point_even_among_duplicates() -> None:
    feats = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    got = herding_select(feats, 4).tolist()
    assert sorted(got) == [0, 1, 2, 3]


def test_kcenter_never_repeats_a_point_even_among_duplicates() -> None:
    feats = torch.tensor([[0.0], [0.0], [1.0]])
    got = kcenter_select(feats, 3).tolist()
    assert sorted(got) == [0, 1, 2]
