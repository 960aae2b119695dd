"""scripts/readme_results.py: the README's table and figures of a finished run, with the tidy tables they came from
copied beside them and the run's precision stated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import report_fixtures as fixtures

SCRIPT = fixtures.ROOT / "scripts" / "readme_results.py"


def test_writes_the_table_the_figures_and_a_copy_of_the_tidy_tables_under_its_name(tmp_path: Path):
    paths = fixtures.write_results(tmp_path)
    verdict_path = paths["results"] / "verdict.json"
    verdict = json.loads(verdict_path.read_text())
    verdict["regime"]["speed"] = {"precision": "fp32", "channels_last": False, "threads": 1,
                                  "reason": {"precision": "fp32: this machine has no native bf16"}}
    verdict_path.write_text(json.dumps(verdict))
    out = tmp_path / "docs"
    done = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--results", str(tmp_path / "results"),
                           "--out", str(out), "--name", "smoke_fp32"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = out / "smoke_fp32"
    assert not (out / "smoke").exists()
    for name in ("stats.csv", "runs.csv", "calibration.csv", "verdict.json"):  # the numbers and their tables agree
        assert (folder / name).read_bytes() == (paths["results"] / name).read_bytes(), name
    assert (folder / "matched.png").stat().st_size > 1000 and (folder / "extended.png").stat().st_size > 1000
    header = (folder / "table.md").read_text().splitlines()[0]
    assert "--name smoke_fp32" in header
    assert header.endswith("Speed settings: fp32 (this machine has no native bf16), NCHW, 1 thread.")
