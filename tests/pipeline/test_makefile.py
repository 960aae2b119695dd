"""The Makefile's set-up step: an install that cannot fit on the disk is refused before it starts, with a one-line
error that names the space needed and the fix (free space, or ``make VENV=<elsewhere>``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(REPO), *arguments], capture_output=True, text=True)


def test_install_without_enough_disk_is_refused_before_it_starts(tmp_path):
    venv = tmp_path / "venv"
    result = _make(f"VENV={venv}", "FREE_GB=2", "test")
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: the venv needs about 7 GB free on the disk of {venv}, and 2 GB are free; free some space, "
                     "or put the venv on a larger disk: make VENV=/larger/disk/kdrepro-venv test"]
    assert not venv.exists()  # nothing half-installed


def test_enough_disk_goes_on_to_create_the_venv(tmp_path):
    # PYTHON=false stands in for the interpreter: the step after the check runs (and fails, harmlessly)
    result = _make(f"VENV={tmp_path / 'venv'}", "FREE_GB=50", "PYTHON=false", "venv")
    assert result.returncode != 0 and "error: the venv needs" not in result.stderr
    lines = (REPO / "Makefile").read_text().splitlines()
    create = next(n for n, line in enumerate(lines, 1) if "$(PYTHON) -m venv $(VENV)" in line)
    assert f"Makefile:{create}:" in result.stderr, result.stderr  # it failed at creating the venv, past the check


def test_free_space_is_measured_where_the_venv_goes(tmp_path):
    dry = _make("-n", f"VENV={tmp_path / 'venv'}", "venv")
    assert dry.returncode == 0
    free = dry.stdout.split('[ -z "', 1)[1].split('"', 1)[0]
    assert free.isdigit(), dry.stdout  # df answered for the venv's folder
