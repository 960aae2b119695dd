"""Statistics of interleaved measurements (A B A B ...): a median with a distribution-free confidence interval.

The benchmarks time two loops alternately, so each adjacent pair saw the same machine state; a pair's difference
(or ratio) cancels drift and other users' load that lasts longer than the pair. The median of the pairs' values
gets the interval of the sign test: order statistics ``(k, n + 1 - k)`` where a Binomial(n, 1/2) count falls below
``k`` with probability at most (1 - confidence) / 2. It assumes nothing about the distribution (timings are skewed,
with stragglers) and needs at least 6 pairs for 95 %.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A median and its confidence interval (``low`` to ``high``) from ``samples`` values."""

    median: float
    low: float
    high: float
    samples: int
    confidence: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def scaled(self, factor: float) -> Interval:
        return Interval(self.median * factor, self.low * factor, self.high * factor, self.samples, self.confidence)


def order_statistic_rank(samples: int, confidence: float = 0.95) -> int:
    """The largest ``k`` with P(Binomial(samples, 1/2) <= k - 1) <= (1 - confidence) / 2; 0 when too few samples."""
    tail, rank = 0.0, 0
    for k in range(samples // 2 + 1):
        tail += math.comb(samples, k) / 2**samples  # P(count <= k)
        if tail > (1 - confidence) / 2:
            break
        rank = k + 1
    return rank


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The median of ``values`` with its sign-test interval; raises a one-line error below the samples it needs."""
    ordered = sorted(values)
    rank = order_statistic_rank(len(ordered), confidence)
    if rank == 0:
        need = next(n for n in range(1, 1000) if order_statistic_rank(n, confidence) > 0)
        raise ValueError(f"{len(ordered)} interleaved pairs cannot give a {100 * confidence:.0f} % interval; use at least {need}")
    return Interval(statistics.median(ordered), ordered[rank - 1], ordered[-rank], len(ordered), confidence)


def paired(first: Sequence[float], second: Sequence[float], how: str = "difference") -> list[float]:
    """Each interleaved pair's ``second - first`` (``difference``) or ``first / second`` (``ratio``)."""
    if len(first) != len(second):
        raise ValueError(f"interleaved series differ in length: {len(first)} and {len(second)}")
    if how == "difference":
        return [b - a for a, b in zip(first, second, strict=True)]
    return [a / b for a, b in zip(first, second, strict=True)]
