"""``benchmarks/local_workers.py``: ``kdrepro launch --executor local`` against ``dvc repro`` in repository copies,
run once on the smoke profile's first stage."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "local_workers.json"


def _state(path: Path) -> tuple[bool, int | None]:
    """Whether ``path`` exists and its modification time in nanoseconds."""
    return (True, path.stat().st_mtime_ns) if path.exists() else (False, None)


def test_after_takes_one_stage_a_time_and_leaves_the_stages_to_time_alone(local_workers):
    options = local_workers.arguments_parser().parse_args(["--after", "teacher", "--after", "calibrate", "student", "data"])
    assert options.after == ["teacher", "calibrate"] and options.targets == ["student", "data"]


@pytest.mark.slow
def test_one_abba_block_builds_the_data_stage_both_ways_and_prints_the_ratio(local_workers, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the repository copies go under tmp_path
    output = tmp_path / "out" / "local_workers.json"
    before = _state(COMMITTED)
    assert local_workers.main(["--pairs", "1", "--workers", "2", "--threads", "1", "--json", str(output), "data"]) == 0
    assert _state(COMMITTED) == before  # the recorded result is left alone

    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed if line.startswith(("repro ", "launch "))] == [
        "repro", "launch", "launch", "repro"]  # fmt: skip
    (block,) = [line for line in printed if line.startswith("block ")]
    match = re.fullmatch(r"block 0: launch / repro wall = (\S+)", block)
    assert match and math.isfinite(float(match.group(1))) and float(match.group(1)) > 0
    (summary,) = [line for line in printed if line.startswith("median ")]
    ratios = re.fullmatch(r"median launch / repro wall = (\S+); CPU seconds launch / repro = (\S+)", summary)
    assert ratios and all(math.isfinite(float(value)) and float(value) > 0 for value in ratios.groups())

    record = json.loads(output.read_text())
    assert record["targets"] == ["data"] and record["after"] == [] and not record["together"]
    assert (record["workers"], record["threads_per_stage"], record["params"]["profile"]) == (2, 1, "smoke")
    assert [(run["block"], run["kind"]) for run in record["runs"]] == [
        (0, "repro"), (0, "launch"), (0, "launch"), (0, "repro")]  # fmt: skip
    assert all(run["wall_seconds"] > 0 and run["cpu_seconds"] > 0 for run in record["runs"])
    walls = {kind: sum(run["wall_seconds"] for run in record["runs"] if run["kind"] == kind) for kind in ("repro", "launch")}
    (ratio,) = record["wall_ratio_per_block"]
    assert ratio == pytest.approx(walls["launch"] / walls["repro"])
    assert f"{ratio:.3f}" == match.group(1)  # the printed ratio is the recorded one
