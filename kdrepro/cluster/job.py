"""What one job runs: ``dvc --wait-for-lock repro --single-item <stage>``, and the state file it keeps.

DVC 3 releases the repository lock while a stage's command runs and takes it again to record the stage in
``dvc.lock``, so stages in separate processes run side by side; without ``--wait-for-lock`` a process gives up on a
lock held for more than 3 s (another job recording its outputs), with it it waits its turn.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: set in a job whose training stage gets several GPUs: ``kdrepro`` then re-runs its command under torchrun
NPROC_ENV = "KDREPRO_NPROC_PER_NODE"

#: launch records, job logs and state files, relative to the repository root (git-ignored)
LOG_DIR = Path("logs") / "cluster"


class StageFailed(RuntimeError):
    """The stage's ``dvc repro`` exited with an error (its log says why)."""


def state_path(root: Path, stage: str) -> Path:
    return root / LOG_DIR / "state" / f"{stage}.json"


def write_state(root: Path, stage: str, state: str, **extra: Any) -> None:
    """``running`` / ``done`` / ``failed`` with the job id and time (atomic: status never reads half a file)."""
    path = state_path(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "state": state, "job_id": job_id(),
              "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **extra}
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record) + "\n")
    partial.replace(path)


def read_state(root: Path, stage: str) -> dict[str, Any] | None:
    path = state_path(root, stage)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record_path(root: Path) -> Path:
    """The last launch: executor, launcher, and per stage its upstream, resources, job id and log."""
    return root / LOG_DIR / "launch.json"


def read_record(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(root).read_text())
    except (OSError, ValueError):
        return None


def write_record(root: Path, record: dict[str, Any]) -> None:
    path = record_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)


def job_id() -> str:
    """SLURM's job id inside a SLURM job, submitit's (the controller's pid) in a local one."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())


def repro_command(stage: str, force: bool = False) -> list[str]:
    """The venv's ``dvc`` (beside this interpreter), waiting for the repository lock instead of failing on it;
    ``force``: run the stage even if DVC finds it up to date (``kdrepro launch --force``)."""
    dvc = Path(sys.executable).parent / "dvc"
    return [str(dvc) if dvc.exists() else "dvc", "--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), stage]


def run_stage(root: str, stage: str, nproc: int = 1, force: bool = False) -> int:
    """The job's body: reproduce ``stage`` in ``root``; raise :class:`StageFailed` (the job fails) on an error."""
    repository = Path(root)
    write_state(repository, stage, "running")
    env = dict(os.environ)
    if nproc > 1:
        env[NPROC_ENV] = str(nproc)
    command = repro_command(stage, force)
    print(f"$ {' '.join(command)}", flush=True)
    returncode = subprocess.run(command, cwd=repository, env=env).returncode
    write_state(repository, stage, "done" if returncode == 0 else "failed", returncode=returncode)
    if returncode != 0:
        raise StageFailed(f"dvc repro --single-item {stage} exited with status {returncode}; its output is above")
    return returncode
