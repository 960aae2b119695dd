"""The `kdrepro` command line: its help, and bad input as one `error:` line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdrepro.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=bogus"], "valid method options"),
        (["method=kd", "teacher_checkpoint=/nonexistent/teacher.pt"], "does not exist"),
        (["method=kd", "teacher_checkpoint=null"], "needs a teacher"),
        (["method=none", "budget.iterations=0"], "must be a positive number"),
        (["method=none", "budget=calibrated", "budget.calibration=/nonexistent.json"], "run `kdrepro calibrate` first"),
        (["method=kd", "dataset.label_set=classes", "dataset.num_classes=19"], "predicts 7 classes"),
    ],
)
def test_bad_input_is_one_line_error_with_exit_2(tiny_teacher, tmp_path, capsys, overrides, message):
    code = main(["train", *tiny_teacher, *overrides, f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "kdrepro", "--help"], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0
    for command in ("train", "calibrate", "evaluate", "prepare", "info", "import-teacher"):
        assert command in result.stdout
