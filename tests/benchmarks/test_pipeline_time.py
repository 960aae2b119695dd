"""``benchmarks/pipeline_time.py``: per-stage wall times of ``dvc repro``, run once in a two-stage DVC repository
made here (never the project's own pipeline)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "pipeline_time.json"
DVC_YAML = """\
stages:
  first:
    cmd: echo one > one.txt
    outs:
      - one.txt
  second:
    cmd: cat one.txt > two.txt
    deps:
      - one.txt
    outs:
      - two.txt
"""


def _two_stage_repository(folder: Path) -> Path:
    """A git + DVC repository in ``folder`` whose dvc.yaml has two ``echo``-sized stages, ``second`` after ``first``."""
    folder.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=folder, check=True)
    (folder / "dvc.yaml").write_text(DVC_YAML)
    return folder


def _state(path: Path) -> tuple[bool, int | None]:
    """Whether ``path`` exists and its modification time in nanoseconds."""
    return (True, path.stat().st_mtime_ns) if path.exists() else (False, None)


@pytest.mark.slow
def test_times_each_stage_of_a_tiny_pipeline_and_writes_where_it_is_told(pipeline_time, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = _two_stage_repository(tmp_path / "repo")
    monkeypatch.chdir(repo)
    output = tmp_path / "out" / "pipeline_time.json"
    before = _state(COMMITTED)
    assert pipeline_time.main(["--json", str(output), "--force"]) == 0  # --json is the script's, --force DVC's
    assert _state(COMMITTED) == before
    assert (repo / "two.txt").read_text().strip() == "one"  # DVC ran both stages, in this repository

    record = json.loads(output.read_text())
    assert list(record["stages"]) == ["first", "second"] and record["exit_code"] == 0
    seconds = [*record["stages"].values(), record["total_seconds"]]
    assert all(math.isfinite(value) and value > 0 for value in seconds)
    assert sum(record["stages"].values()) <= record["total_seconds"]  # a stage ends where the next one starts

    table = capsys.readouterr().out.splitlines()
    rows = table[table.index(f"{'stage':<36} {'seconds':>8}") + 1 :]
    assert [row.split()[0] for row in rows] == ["first", "second", "total"]
    assert rows[-1].endswith("exit 0")


@pytest.mark.slow
def test_a_failing_stage_gives_dvcs_exit_status(pipeline_time, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = _two_stage_repository(tmp_path / "repo")
    (repo / "dvc.yaml").write_text(DVC_YAML.replace("cat one.txt", "false && cat one.txt"))
    monkeypatch.chdir(repo)
    output = tmp_path / "pipeline_time.json"
    assert pipeline_time.main(["--json", str(output)]) != 0
    record = json.loads(output.read_text())
    assert list(record["stages"]) == ["first", "second"] and record["exit_code"] != 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"exit {record['exit_code']}")
