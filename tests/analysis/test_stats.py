"""Intervals, paired differences and the per-(protocol, method) summary, checked against hand computations."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kdrepro.analysis.stats import paired_difference, pairwise, significant, summarize, t_interval


def test_t_interval_matches_hand_computation():
    # values 10, 12, 14: mean 12, sd 2, t_{0.975,2} = 4.302652729911275, half = 4.3027 * 2 / sqrt(3) = 4.96828
    mean, sd, low, high, n = t_interval([10.0, 12.0, 14.0])
    assert (mean, sd, n) == (12.0, 2.0, 3)
    assert low == pytest.approx(12 - 4.968275, abs=1e-5)
    assert high == pytest.approx(12 + 4.968275, abs=1e-5)


def test_t_interval_needs_two_values_and_ignores_nan():
    mean, sd, low, high, n = t_interval([5.0, float("nan")])
    assert mean == 5.0 and n == 1 and math.isnan(sd) and math.isnan(low) and math.isnan(high)
    assert t_interval([])[4] == 0


def test_significant_only_when_the_interval_excludes_zero():
    assert significant(0.1, 2.0) and significant(-3.0, -0.5)
    assert not significant(-0.1, 2.0)
    assert not significant(float("nan"), float("nan"))


def test_paired_difference_uses_only_common_seeds():
    a = pd.Series({0: 11.0, 1: 13.0, 2: 12.0, 3: 99.0})
    b = pd.Series({0: 10.0, 1: 11.0, 2: 11.0})
    diff = paired_difference(a, b)
    # differences 1, 2, 1: mean 4/3, sd 0.57735, half = 4.302653 * 0.57735 / sqrt(3) = 1.434218
    assert diff["n"] == 3
    assert diff["mean"] == pytest.approx(4 / 3)
    assert diff["ci_low"] == pytest.approx(4 / 3 - 1.434218, abs=1e-5)
    assert diff["significant"] is False  # 1.333 - 1.434 < 0


def _runs(rows):
    return pd.DataFrame(rows, columns=["protocol", "method", "multiplier", "seed", "miou", "iterations", "train_seconds", "family"])


def test_paired_differences_are_tighter_than_unpaired_spread():
    # a large seed effect shared by both methods, a constant +1 point method effect: the pair is significant
    rows = []
    for seed, base in enumerate([0.10, 0.20, 0.30]):
        rows.append(("iter_matched", "none", 1.0, seed, base, 50, 1.0, "student"))
        rows.append(("iter_matched", "kd", 1.0, seed, base + 0.01 + 0.001 * seed, 50, 1.5, "canonical"))
    stats = summarize(_runs(rows), teacher_miou_pct=40.0).set_index("method")
    assert stats.loc["kd", "miou_mean"] == pytest.approx(21.1)
    assert stats.loc["kd", "miou_ci_low"] < stats.loc["none", "miou_mean"]  # unpaired intervals overlap...
    assert stats.loc["kd", "delta_student_significant"]  # ...but the paired difference is clear
    assert stats.loc["kd", "delta_student_mean"] == pytest.approx(1.1)
    assert stats.loc["kd", "percent_of_teacher_mean"] == pytest.approx(100 * 21.1 / 40)
    assert math.isnan(stats.loc["none", "delta_student_mean"])
    assert not stats.loc["none", "delta_student_significant"]


def test_diverged_runs_are_counted_not_averaged():
    rows = [("compute_matched", "cwd", 1.0, 0, 0.2, 9, 1.0, "segmentation_specific"),
            ("compute_matched", "cwd", 1.0, 1, float("nan"), 3, None, "segmentation_specific")]
    row = summarize(_runs(rows)).iloc[0]
    assert row.n_seeds == 1 and row.n_diverged == 1 and row.miou_mean == pytest.approx(20.0)


def test_pairwise_lists_every_ordered_pair():
    rows = [("iter_matched", m, 1.0, s, v, 1, 1.0, "x") for s in range(2) for m, v in (("a", 0.1), ("b", 0.2), ("c", 0.3))]
    table = pairwise(_runs(rows), "iter_matched")
    assert len(table) == 6
    assert table[(table.a == "c") & (table.b == "a")]["mean"].iloc[0] == pytest.approx(20.0)
