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


# ----------------------------------------------------------------------------------------- collapse to one class
COLLAPSED_IOU = [0.362, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # BPKD in the embedded run: "flat" everywhere, 5.2 mIoU
HEALTHY_IOU = [0.866, 0.608, 0.0, 0.579, 0.640, 0.0, 0.629]


@pytest.mark.parametrize(("per_class_iou", "expected"), [
    (COLLAPSED_IOU, True),
    ([0.362, 0.004, 0.0, 0.0, 0.0, 0.0, 0.0], True),  # a few stray pixels of a second class
    (HEALTHY_IOU, False),
    ([0.9, 0.02, None, math.nan, 0.0], False),  # two classes above 1 %; the absent ones do not count
    ([0.9, None, None, math.nan, 0.0], True),  # one class above 1 % of the two scored
    ([0.9, None, None, math.nan], False),  # one class scored: nothing to collapse from
    (None, False),  # no per-class IoU (diverged, or an older metrics.json)
])  # fmt: skip
def test_a_run_collapsed_when_at_most_one_scored_class_is_above_one_percent(per_class_iou, expected):
    from kdrepro.analysis.regime import collapsed

    assert collapsed(per_class_iou) is expected


def _write_run(runs_dir, run: str, miou, per_class_iou, diverged=None):
    import json

    folder = runs_dir / run
    folder.mkdir(parents=True)
    metrics = {"miou": miou, "per_class_iou": per_class_iou, "method": run.split("/")[1], "iterations": 10,
               "train_seconds": 1.0} | ({"diverged": {"step": diverged}} if diverged is not None else {})  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _collapse_runs(tmp_path):
    """One collapsed, one healthy, one diverged and one healthy run with classes absent from validation (NaN)."""
    from kdrepro.analysis.results import collect_runs

    runs_dir = tmp_path / "runs"
    _write_run(runs_dir, "iter_matched/bpkd/seed0", 0.0517, COLLAPSED_IOU)
    _write_run(runs_dir, "iter_matched/bpkd/seed1", 0.47, HEALTHY_IOU)
    _write_run(runs_dir, "iter_matched/bpkd/seed2", None, None, diverged=12)
    _write_run(runs_dir, "iter_matched/kd/seed0", 0.5, [0.8, 0.2, None, None, 0.5])
    return collect_runs(runs_dir)


def test_runs_table_flags_the_collapsed_run_only(tmp_path):
    runs = _collapse_runs(tmp_path).set_index("run")
    assert runs["collapsed"].to_dict() == {"iter_matched/bpkd/seed0": True, "iter_matched/bpkd/seed1": False,
                                           "iter_matched/bpkd/seed2": False, "iter_matched/kd/seed0": False}
    assert runs.loc["iter_matched/bpkd/seed2", "diverged_at"] == 12  # diverged, not collapsed


def test_stats_count_collapsed_runs_and_keep_them_in_the_mean(tmp_path):
    from kdrepro.analysis.stats import summarize

    stats = summarize(_collapse_runs(tmp_path)).set_index("method")
    assert stats.loc["bpkd", "n_collapsed"] == 1 and stats.loc["bpkd", "n_diverged"] == 1
    assert stats.loc["bpkd", "n_seeds"] == 2 and stats.loc["bpkd", "miou_mean"] == pytest.approx((5.17 + 47) / 2)
    assert stats.loc["kd", "n_collapsed"] == 0


def test_regime_lists_the_methods_with_collapsed_runs(tmp_path):
    from kdrepro.analysis.regime import collapsed_methods, regime
    from kdrepro.analysis.stats import summarize

    runs = _collapse_runs(tmp_path)
    stats = summarize(runs)
    assert collapsed_methods(stats) == {"bpkd": {"runs": 1, "of": 3, "by_protocol": [
        {"protocol": "iter_matched", "multiplier": 1.0, "collapsed": 1, "seeds": 3}]}}  # fmt: skip
    assert regime(runs, stats, "synthetic")["collapsed"] == collapsed_methods(stats)
    assert collapsed_methods(summarize(runs[runs.method == "kd"])) == {}


def test_verdict_record_carries_the_collapsed_methods(tmp_path):
    from kdrepro.analysis.results import collect_per_class, verdict_record
    from kdrepro.analysis.stats import summarize

    runs = _collapse_runs(tmp_path)
    record = verdict_record(runs, summarize(runs), collect_per_class(tmp_path / "runs"), "synthetic", None)
    assert record["regime"]["collapsed"]["bpkd"]["runs"] == 1 and record["regime"]["collapse_threshold"] == 0.01
