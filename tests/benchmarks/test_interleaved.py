"""The interleaved benchmarks' statistics: the sign test's interval of a median."""

from __future__ import annotations

import pytest
from interleaved import Interval, median_interval, order_statistic_rank, paired


def test_order_statistic_ranks_match_the_sign_test_table():
    # 95 %: n = 6 -> (1, 6), n = 20 -> (6, 15), n = 50 -> (18, 33); fewer than 6 pairs give no 95 % interval
    assert [order_statistic_rank(n) for n in (5, 6, 20, 50)] == [0, 1, 6, 18]


def test_median_interval_and_too_few_pairs():
    interval = median_interval([float(v) for v in range(1, 21)])
    assert (interval.median, interval.low, interval.high) == (10.5, 6.0, 15.0)
    with pytest.raises(ValueError, match="use at least 6"):
        median_interval([1.0, 2.0, 3.0])


def test_paired_differences_and_ratios():
    assert paired([1.0, 2.0], [1.5, 2.5]) == [0.5, 0.5]
    assert paired([2.0, 3.0], [1.0, 1.5], "ratio") == [2.0, 2.0]
    assert Interval(1.0, -1.0, 2.0, 6, 0.95).scaled(2).high == 4.0
