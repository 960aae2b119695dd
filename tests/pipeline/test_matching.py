"""Compute matching (kdrepro.pipeline.matching): the reference choice, the formula, the calibration files."""

from __future__ import annotations

import json

import pytest

from kdrepro.errors import ConfigError
from kdrepro.pipeline.matching import (
    budget_seconds,
    iterations_within,
    matched_iterations,
    read_header,
    read_method,
    read_previous,
    read_table,
    reference_method,
    whole_iterations,
    write_calibration,
)

METHODS = {
    "none": {"seconds_per_iteration": 0.1, "fingerprint": "a"},
    "kd": {"seconds_per_iteration": 0.2, "fingerprint": "b"},
    "maskd": {"seconds_per_iteration": 0.15, "pretrain_seconds": 3.0, "fingerprint": "c"},
}


def test_matched_iterations_reference_is_slowest():
    methods = {
        "none": {"seconds_per_iteration": 0.1},
        "kd": {"seconds_per_iteration": 0.2},
        "cirkd": {"seconds_per_iteration": 0.4, "pretrain_seconds": 0.0},
    }
    matched = matched_iterations(methods, reference_iterations=100)
    assert matched["reference_method"] == "cirkd"
    assert matched["budget_seconds"] == pytest.approx(40.0)
    assert matched["iterations"] == {"none": 400, "kd": 200, "cirkd": 100}
    assert matched_iterations(methods, 100, "kd")["iterations"]["cirkd"] == 50


def test_reference_is_the_configured_method_else_the_slowest():
    assert reference_method(METHODS) == "kd"
    assert reference_method(METHODS, "none") == "none"
    with pytest.raises(ConfigError, match="'cwd' is not among the calibrated methods"):
        reference_method(METHODS, "cwd")


def test_formula_charges_pre_training_once():
    assert budget_seconds(METHODS["maskd"], 100) == pytest.approx(100 * 0.15 + 3.0)
    assert iterations_within(20.0, METHODS["maskd"]) == 113  # (20 - 3) / 0.15 = 113.3
    assert iterations_within(2.0, METHODS["maskd"]) < 0  # even the pre-training does not fit
    assert whole_iterations(100 * 0.4, 0.4) == 100  # not 99 from float round-off
    matched = matched_iterations(METHODS, 100)
    assert matched["budget_seconds"] == pytest.approx(20.0)
    assert matched["iterations"] == {"none": 200, "kd": 100, "maskd": 113}


def test_written_files_read_back_and_unchanged_files_keep_their_bytes(tmp_path):
    output = tmp_path / "calibration.json"
    table = {"world_size": 1, "methods": METHODS, "matched": matched_iterations(METHODS, 100)}
    write_calibration(output, table)
    folder = tmp_path / "calibration"
    assert sorted(p.name for p in folder.iterdir()) == ["budget.json", "kd.json", "maskd.json", "none.json"]
    assert read_table(output)["matched"] == table["matched"]
    assert read_header(output) == {key: value for key, value in table.items() if key != "methods"}
    assert read_previous(output) == METHODS
    for source in (output, folder):
        budget, world, entry, known = read_method(source, "maskd")
        assert (budget, world, entry["pretrain_seconds"], known) == (pytest.approx(20.0), 1, 3.0, ["kd", "maskd", "none"])
    assert read_method(folder, "cwd")[2] is None
    stamp = (folder / "kd.json").stat().st_mtime_ns
    smaller = {name: METHODS[name] for name in ("none", "kd")}
    write_calibration(output, {"world_size": 1, "methods": smaller, "matched": matched_iterations(smaller, 100)})
    assert not (folder / "maskd.json").exists() and (folder / "kd.json").stat().st_mtime_ns == stamp


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; run"):
        read_table(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="does not exist"):
        read_method(tmp_path / "missing.json", "kd")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"methods": {"kd": {"seconds_per_iteration": 0}}}))
    with pytest.raises(ConfigError, match="malformed"):
        read_table(broken)
    with pytest.raises(ConfigError, match="malformed or incomplete"):
        read_method(broken, "kd")
    assert read_header(tmp_path / "missing.json") == {} and read_previous(broken) == {}
