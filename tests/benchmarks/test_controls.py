"""``benchmarks/controls.py``: the regime's controls (student alone, teacher, positive control) and their record."""

from __future__ import annotations

import json
import math

import pytest


def test_positive_control_needs_an_interval_excluding_zero_and_a_point_of_gain(controls):
    rows = {"none": [40.0, 41.0, 39.0], "kd": [42.0, 43.1, 40.9], "cwd": [40.5, 42.0, 38.7],
            "none_x4": [50.0, 51.0, 49.0]}  # fmt: skip
    summary = controls.summarize(rows, teacher_miou=55.0, long=4.0)
    kd, cwd = summary["positive_control"]["kd"], summary["positive_control"]["cwd"]
    assert kd["significant"] and kd["passes"] and kd["mean"] == pytest.approx(2.0)
    assert not cwd["significant"] and not cwd["passes"]  # +0.4 with a spread of seeds: inside the noise
    assert not summary["positive_control_passes"]
    assert summary["capacity_gap"] == pytest.approx(5.0)
    assert summary["schedule_ratio"] == pytest.approx(40.0 / 50.0)


def test_a_significant_gain_below_one_point_does_not_pass(controls):
    rows = {"none": [40.0, 41.0, 39.0], "kd": [40.5, 41.5, 39.5], "cwd": [42.0, 43.0, 41.0], "none_x4": [50.0] * 3}
    summary = controls.summarize(rows, teacher_miou=None, long=4.0)
    assert summary["positive_control"]["kd"]["significant"] and not summary["positive_control"]["kd"]["passes"]
    assert "capacity_gap" not in summary and summary["kd_minus_cwd"]["mean"] == pytest.approx(-1.5)


def test_one_seed_has_no_interval(controls):
    assert math.isnan(controls.paired([1.0], [0.0])["half_width"])
    assert not controls.paired([1.0], [0.0])["significant"]


@pytest.mark.slow
def test_runs_once_on_the_smoke_profile(controls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh folder: pre-trains the smoke backbones itself
    output = tmp_path / "controls.json"
    record = controls.main(["--profile", "smoke", "--seeds", "0", "1", "--iterations", "2", "--long", "2",
                            "--work", str(tmp_path / "work"), "--json", str(output)])  # fmt: skip
    assert set(record["rows"]) == {"none", "kd", "cwd", "none_x2"}
    assert all(len(values) == 2 for values in record["rows"].values())
    assert record["summary"]["teacher"] is not None and "capacity_gap" in record["summary"]
    assert json.loads(output.read_text())["iterations"] == 2
