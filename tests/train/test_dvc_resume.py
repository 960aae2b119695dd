"""Resume inside `dvc repro`: a training stage with a `persist` output, interrupted by Ctrl-C or by killing `dvc`,
continues where it stopped on the next `dvc repro`; a changed config moves the old run aside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdrepro.io import load_checkpoint
from kdrepro.train.signals import POLL_SECONDS

FAULTS = Path(__file__).with_name("faults.py")
DVC = Path(sys.executable).with_name("dvc")

pytestmark = pytest.mark.slow


def write_stage(repo: Path, overrides: list[str]) -> None:
    command = " ".join([sys.executable, str(FAULTS), "train", *overrides, "out_dir=run", "on_config_change=archive"])
    stage = {"cmd": command, "outs": [{"run": {"persist": True}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, width=10_000))


def repro(repo: Path, fault: str = "", marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "KDREPRO_FAULT": fault, "KDREPRO_FAULT_MARKER": str(marker or "")}
    return subprocess.Popen([str(DVC), "repro", "--no-run-cache"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def dvc(repo: Path, *args: str) -> str:
    """Run ``dvc <args>`` in ``repo``; stdout and stderr (kdrepro logs there) together."""
    result = subprocess.run([str(DVC), *args], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    return result.stdout


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the stage never reached its pause"
        time.sleep(0.05)


def gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_interrupted_stage_resumes_on_the_next_repro(tiny_dataset, tmp_path):
    repo, marker = tmp_path / "repo", tmp_path / "paused"
    repo.mkdir()
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=repo, check=True)
    overrides = [*tiny_dataset, "method=none", "budget.iterations=5", "threads=1"]
    write_stage(repo, overrides)

    # Ctrl-C: the terminal sends SIGINT to the whole foreground group (dvc ignores it while its stage runs)
    process = repro(repo, "pause_step:2", marker)
    wait_for(marker, process)
    os.killpg(process.pid, signal.SIGINT)
    marker.with_suffix(".go").touch()
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0 and "interrupted by signal 2" in output and "at step 2" in output, output[-3000:]
    assert load_checkpoint(repo / "run" / "checkpoint.pt")["step"] == 2
    output = dvc(repo, "repro")
    assert "resuming run at step 2" in output, output[-3000:]
    assert (repo / "run" / "metrics.json").is_file()
    status = dvc(repo, "status")
    assert "up to date" in status, status
    assert any(p.is_file() for p in (repo / ".dvc" / "cache").rglob("*"))  # persist outputs are still cached

    # a changed config: the finished run is moved aside, not reused and not lost; killing dvc ends its child
    before = (repo / "run" / "metrics.json").read_bytes()
    write_stage(repo, [*overrides[:-2], "budget.iterations=6", "threads=1"])
    marker.unlink()
    marker.with_suffix(".go").unlink()
    process = repro(repo, "pause_step:2", marker)
    wait_for(marker, process)
    child = int((repo / "run" / ".kdrepro.lock").read_text())
    process.send_signal(signal.SIGTERM)  # dvc alone, not its group
    process.wait(timeout=30)
    time.sleep(4 * POLL_SECONDS)  # the child's parent watch notices within one poll and sends itself SIGTERM
    marker.with_suffix(".go").touch()
    assert gone(child), "kdrepro outlived the dvc process that started it"
    assert load_checkpoint(repo / "run" / "checkpoint.pt")["step"] == 2
    (archived,) = repo.glob("run.superseded-*")
    assert (archived / "metrics.json").read_bytes() == before
    output = dvc(repo, "repro")
    assert "resuming run at step 2" in output and (repo / "run" / "metrics.json").is_file(), output[-3000:]
    assert "up to date" in dvc(repo, "status")
