"""``benchmarks/calibration_load.py``: cost ratios without / with an extra process, by several estimators."""

from __future__ import annotations

import pytest


def _run(none: list[float], kd: list[float], per_round: int = 2) -> dict:
    return {"iterations_per_round": per_round, "methods": {"none": {"timed": none}, "kd": {"timed": kd}}}


def test_paired_estimator_cancels_load_that_changes_between_rounds(calibration_load):
    # the student alone costs half of kd; round 2 ran three times slower for both (another process started)
    run = _run(none=[0.5, 0.5, 1.5, 1.5, 0.5, 0.5], kd=[1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    assert calibration_load.ratios(run, "kd", "paired")["none"] == pytest.approx(0.5)
    assert calibration_load.ratios(run, "kd", "median")["none"] == pytest.approx(0.5 / 3.0)  # the medians do not pair
    assert calibration_load.ratios(run, "kd", "min")["none"] == pytest.approx(0.5)
    assert calibration_load.ratios(run, "kd", "p25")["kd"] == pytest.approx(1.0)


def test_change_per_pair_and_its_interval_from_six_repeats(calibration_load):
    idle = [_run([0.5] * 2, [1.0] * 2, per_round=1) for _ in range(6)]
    busy = [_run([0.6] * 2, [1.0] * 2, per_round=1) for _ in range(6)]  # 20 % dearer beside the extra process
    row = calibration_load.changes({("after", False): idle, ("after", True): busy}, "after", "none", "kd", "median")
    assert (row["idle"], row["busy"]) == (pytest.approx(0.5), pytest.approx(0.6))
    assert row["change"] == pytest.approx(0.2) and row["interval"] == [pytest.approx(0.2), pytest.approx(0.2)]
    five = calibration_load.changes({("after", False): idle[:5], ("after", True): busy[:5]}, "after", "none", "kd", "min")
    assert five["interval"] is None  # fewer than 6 pairs give no 95 % interval


def test_an_unknown_setting_is_refused_in_one_line(calibration_load):
    with pytest.raises(SystemExit, match="unknown setting.*use any of before, after, one-thread"):
        calibration_load.main(["--settings", "after,idle"])
