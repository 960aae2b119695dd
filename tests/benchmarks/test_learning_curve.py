"""``benchmarks/learning_curve.py``: the student alone at 1/2, 1, 2 and 4 times the reference schedule, and the
teacher, run once at unit-test size (``tiny_dataset``: width-8 models, 32x64 crops, batch 2)."""

from __future__ import annotations

import json
import math
import re

import pytest

FACTORS = [0.5, 1.0, 2.0, 4.0]


@pytest.mark.slow
def test_one_seed_at_a_two_iteration_schedule_records_every_factor_and_the_ratio(learning_curve, tiny_dataset, tmp_path,
                                                                              monkeypatch, capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/, benchmarks/results/) stay in tmp_path
    output = tmp_path / "out" / "learning_curve.json"
    summary = learning_curve.main(["--profile", "synthetic", "--seeds", "0", "--teacher", "--work", str(tmp_path / "work"),
                                   "--json", str(output), "--", *tiny_dataset, "reference_iterations=2",
                                   "teacher_iterations=2"])  # fmt: skip
    record = json.loads(output.read_text())
    assert record == json.loads(json.dumps(summary))  # what it returns is what it wrote
    assert (record["profile"], record["reference_iterations"]) == ("synthetic", 2)  # the overrides reached the runs
    assert [row["factor"] for row in record["rows"]] == FACTORS
    assert [row["iterations"] for row in record["rows"]] == [1, 2, 4, 8]
    for row in record["rows"]:
        assert row["seeds"] == [0] and row["miou_sd"] is None  # one seed: no spread
        assert 0 <= row["miou_mean"] <= 100 and row["wall_seconds"] > 0
        assert (tmp_path / "work" / "synthetic" / f"lr{row['lr']:g}" / f"it{row['iterations']}").is_dir()
    (lr,) = {row["lr"] for row in record["rows"]}  # the profile's learning rate only
    (ratio,) = record["ratio_at_reference"].values()
    at = {row["factor"]: row["miou_mean"] for row in record["rows"]}
    assert math.isfinite(ratio) and ratio > 0 and ratio == pytest.approx(at[1.0] / at[4.0])
    assert record["teacher"]["iterations"] == 2 and 0 <= record["teacher"]["miou"] <= 1

    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index(f"{'lr':>6} {'x':>4} {'iterations':>10} {'mIoU':>6} {'sd':>5}") + 1 :][:4]
    assert [float(line.split()[1]) for line in table] == FACTORS and all(line.split()[-1] == "-" for line in table)
    (line,) = [line for line in printed if line.startswith(f"lr {lr:g}: mIoU at the schedule / at 4x = ")]
    assert re.search(rf"= {ratio:.2f} \((past )?early training\)$", line)
    assert any(line.startswith("teacher: ") and line.endswith("after 2 iterations") for line in printed)
    assert printed[-1] == f"written {output}"
