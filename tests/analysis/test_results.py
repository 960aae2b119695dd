"""Per-class evidence: which classes a run learns, and whether a single class decides a comparison."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kdrepro.analysis.regime import classes_learned, deciding_classes
from kdrepro.analysis.results import extended_selection


def _per_class(rows):
    return pd.DataFrame(rows, columns=["protocol", "method", "multiplier", "seed", "class_name", "iou"])


def test_classes_learned_counts_present_classes_with_positive_mean_iou():
    rows = [("iter_matched", "none", 1.0, s, c, v) for s in (0, 1)
            for c, v in (("road", 80.0), ("pole", 0.0), ("train", math.nan), ("person", 1.0 * s))]  # fmt: skip
    result = classes_learned(_per_class(rows))
    assert result == {"present": 3, "learned": 2, "not_learned": ["pole"]}


def test_one_class_deciding_a_comparison_is_named():
    rows = []
    for seed in (0, 1):
        for cls, a, b in (("road", 80, 81), ("building", 60, 61), ("vegetation", 40, 30)):
            rows += [("compute_matched", "kd", 1.0, seed, cls, a), ("compute_matched", "dist", 1.0, seed, cls, b)]
    result = deciding_classes(_per_class(rows), "compute_matched", "kd", "dist")
    assert result["difference"] == pytest.approx((-1 - 1 + 10) / 3)
    assert result["deciding"] == ["vegetation"] and result["largest"] == "vegetation"
    assert result["largest_share"] == pytest.approx(10 / 12)


def test_no_deciding_class_when_the_difference_is_broad():
    rows = [("compute_matched", m, 1.0, 0, c, v) for c in ("a", "b", "c", "d") for m, v in (("kd", 50), ("cwd", 48))]
    assert deciding_classes(_per_class(rows), "compute_matched", "kd", "cwd")["deciding"] == []


def test_extended_selection_takes_the_best_specific_mean():
    runs = pd.DataFrame(
        [("compute_matched", m, 1.0, s, v, f) for s in (0, 1)
         for m, v, f in (("kd", 0.30, "canonical"), ("cwd", 0.20, "segmentation_specific"),
                         ("dist", 0.25, "segmentation_specific"))],  # fmt: skip
        columns=["protocol", "method", "multiplier", "seed", "miou", "family"],
    )
    selection = extended_selection(runs)
    assert selection["method"] == "dist" and selection["candidates"] == ["cwd", "dist"]
    assert selection["means"] == {"cwd": 20.0, "dist": 25.0}


def test_regime_states_the_schedule_fraction_and_the_teacher_gap_at_the_longest_control():
    from kdrepro.analysis.regime import regime
    from kdrepro.analysis.stats import summarize

    rows = [("teacher", "teacher", 1.0, 0, 0.52, 1000, 100.0)]
    for seed, noise in ((0, -0.01), (1, 0.0), (2, 0.01)):
        rows += [("iter_matched", "none", 1.0, seed, 0.43 + noise, 60, 3.0),
                 ("extended", "none", 2.0, seed, 0.48 + noise, 240, 12.0), ("extended", "none", 4.0, seed, 0.51 + noise, 480, 24.0)]  # fmt: skip
    runs = pd.DataFrame(rows, columns=["protocol", "method", "multiplier", "seed", "miou", "iterations", "train_seconds"])
    result = regime(runs, summarize(runs[runs.protocol != "teacher"], 52.0), "synthetic")
    assert result["teacher_gap"] == pytest.approx(9.0)
    assert result["student_longer_iterations"] == 240 and result["student_fraction_of_longer"] == pytest.approx(43 / 48)
    assert result["teacher_gap_at_longest_control"] == pytest.approx(1.0) and result["longest_control_iterations"] == 480
    assert "past early training" in result["schedule"] and "the student alone is 1.0 points below the teacher" in result["schedule"]
