"""The plan's wall-clock on G GPUs: once-per-pipeline stages in a row, then each phase packed on G // world slots."""

from __future__ import annotations

import pytest

from kdrepro.cluster.schedule import makespan, wall_clock

ROWS = [
    {"stage": "teacher", "per": "pipeline", "seconds": 100.0},
    {"stage": "calibrate", "per": "pipeline", "seconds": 10.0},
    {"stage": "iter_matched", "per": "seed", "seconds": 40.0},
    {"stage": "compute_matched", "per": "seed", "seconds": 60.0},
    {"stage": "extended ×2", "per": "seed", "seconds": 120.0},
]


def test_makespan_packs_longest_first():
    assert makespan([5, 4, 3, 3, 3], 2) == 10  # LPT: 5 | 4, then 3 -> 4 (7), 3 -> 5 (8), 3 -> 7 (10)
    assert makespan([7, 1], 8) == 7 and makespan([], 4) == 0 and makespan([2, 2, 2], 1) == 6


def test_wall_clock_on_one_and_eight_gpus():
    one = wall_clock(ROWS, seeds=3, gpus=1, world_size=1)
    assert one["seconds"] == pytest.approx(110 + 3 * (40 + 60) + 3 * 120)  # everything in a row
    eight = wall_clock(ROWS, seeds=3, gpus=8, world_size=1)
    assert eight["parallel_runs"] == 8 and eight["seconds"] == pytest.approx(110 + 60 + 120)  # the longest run per phase
    four_per_run = wall_clock(ROWS, seeds=3, gpus=8, world_size=4)
    assert four_per_run["parallel_runs"] == 2 and four_per_run["seconds"] == pytest.approx(110 + 160 + 240)  # 2 slots: 60 | 60, 60, 40 | 40, 40
    assert wall_clock(ROWS, seeds=3, gpus=2, world_size=4)["seconds"] is None
