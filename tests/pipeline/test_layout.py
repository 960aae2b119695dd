"""One function builds a run folder's path, one parses it back."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdrepro.pipeline.layout import RunKey, method_dir, parse_run_path, run_path


@pytest.mark.parametrize(
    "key",
    [RunKey("iter_matched", "kd", 1.0, 0), RunKey("compute_matched", "none", 1.0, 3), RunKey("extended", "fitnet", 2.0, 1),
     RunKey("extended", "best_specific", 1.5, 2), RunKey("extended", "kd_fitnet", 8.0, 0)],
)
def test_paths_round_trip(key, tmp_path):
    multiplier = key.multiplier if key.protocol == "extended" else None
    path = run_path(tmp_path, key.protocol, key.method, multiplier, key.seed)
    assert parse_run_path(tmp_path, path) == key


def test_layout_strings():
    assert run_path("runs/x", "extended", "kd", "2", 0) == Path("runs/x/extended/kd-2/seed0")
    assert run_path("runs/x", "extended", "kd", 1.5, 0) == Path("runs/x/extended/kd-1.5/seed0")
    assert method_dir("runs/x", "compute_matched", "cwd") == Path("runs/x/compute_matched/cwd")
    assert run_path("runs/x", "teacher", "teacher") == Path("runs/x/teacher")
    assert parse_run_path("runs/x", "runs/x/teacher") == RunKey("teacher", "teacher")


@pytest.mark.parametrize(
    "relative",
    ["calibration", "iter_matched/kd/dvclive", "extended/kd/seed0", "extended/kd-x/seed0", "iter_matched/kd/seedX",
     "compute_matched.superseded-20261130T000000/kd/seed0", "other/kd/seed0",
     "iter_matched/kd/seed0.superseded-20261130T000000Z", "teacher.superseded-20261130T000000Z"],
)
def test_other_folders_are_not_runs(relative, tmp_path):
    assert parse_run_path(tmp_path, tmp_path / relative) is None


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        method_dir(tmp_path, "extended", "kd")  # no multiplier
    with pytest.raises(ValueError):
        method_dir(tmp_path, "iter_matched", "kd", 2)
    with pytest.raises(ValueError):
        method_dir(tmp_path, "nonsense", "kd")


def test_superseded_marker_matches_the_run_folder_code():
    from kdrepro.pipeline.layout import SUPERSEDED
    from kdrepro.train.run_folder import SUPERSEDED_INFIX

    assert SUPERSEDED == SUPERSEDED_INFIX
    assert parse_run_path("r", "r/iter_matched/kd.superseded-20261130T000000Z") is None
    assert parse_run_path("r", "r/extended/kd-2.superseded-20261130T000000Z/seed0") is None
