"""benchmarks/precision.py (auto vs every fixed precision / layout) and the full-size benchmark's progress lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_precision_benchmark_runs_one_round_and_reports_auto_against_the_best_fixed_choice(precision, tmp_path, capsys):
    benchmark = precision
    output = tmp_path / "precision.json"
    assert benchmark.main(["--tiny", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "auto decided" in printed and "auto / best fixed" in printed
    result = json.loads(output.read_text())
    fixed = set(result["seconds"]["cpu"])
    assert fixed == {"fp32/nchw", "fp32/channels_last", "bf16/nchw", "bf16/channels_last"}
    assert set(result["auto"]) == {"methods", "teacher", "student"} and set(result["auto"].values()) <= fixed
    for clock in ("wall", "cpu"):
        rows = result["summary"][clock]
        assert set(rows) == {"student pretrain", "teacher", "kd (methods)", "student (methods)", "sum"}
        assert all(row["auto_over_best"][0] > 0 and row["best"] in fixed for row in rows.values())
        assert rows["teacher"]["auto"] == result["auto"]["teacher"] and rows["sum"]["auto"] == "auto"


def test_the_sum_row_adds_each_workload_at_its_roles_choice(precision):
    seconds = {"a": {"student": [1.0], "teacher": [10.0], "kd": [5.0]}, "b": {"student": [2.0], "teacher": [8.0], "kd": [4.0]}}
    result = {"auto": {"student": "a", "teacher": "b", "methods": "b"}, "seconds": {"cpu": seconds}}
    rows = precision.summary(result)["cpu"]
    assert rows["sum"]["median_ms"]["auto"] == pytest.approx(1000 * (1.0 + 8.0 + 4.0))  # below both fixed sums
    assert rows["sum"]["best"] == "b" and rows["sum"]["auto_over_best"][0] == pytest.approx(13 / 14)
    assert rows["student (methods)"]["auto_over_best"][0] == pytest.approx(2.0)  # the student-alone runs at b: 2x


def test_ratio_interval_is_paired_by_round(precision):
    benchmark = precision
    ratio, low, high = benchmark.ratio_interval([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert (ratio, low, high) == (1.0, 1.0, 1.0)  # drift between rounds cancels in the paired ratio
    ratio, low, high = benchmark.ratio_interval([1.1, 2.2, 3.3, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert low <= ratio <= high and ratio == pytest.approx(1.1)


def test_full_size_benchmark_prints_the_steps_progress_while_it_runs(full_size, tmp_path, capsys):
    benchmark = full_size
    log = tmp_path / "step.log"
    writer = ("import sys, time\n"
              "print('12:00:00 kdrepro.progress: train (kd, seed 0) Iter [1/3]  0.50 it/s  eta: 0:00:04  loss: 1.0000',"
              " file=sys.stderr, flush=True)\n"
              "time.sleep(1.5)\n")  # fmt: skip
    with open(log, "w") as handle:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", writer], stdout=handle, stderr=subprocess.STDOUT)
        status, _ = benchmark._wait(process.pid, log, start, progress_seconds=0.5)
    assert status == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) >= 2  # a line every 0.5 s of a 1.5 s step
    assert any(line.endswith("train (kd, seed 0) Iter [1/3]  0.50 it/s  eta: 0:00:04  loss: 1.0000") for line in lines)
