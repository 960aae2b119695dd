"""``kdrepro status``: each stage of the last launch as queued, running, done, failed or cancelled, with its log.

The truth is in two places: the state file each job writes when it starts and ends (``logs/cluster/state/``) and,
for SLURM, ``squeue`` (pending jobs, and jobs the controller still remembers after they ended). No accounting
database is needed: a job that says "running" but that the scheduler no longer runs was killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kdrepro.cluster.job import read_record, read_state
from kdrepro.errors import KdreproError

#: SLURM job states that mean the job is still queued or running
SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


@dataclass(frozen=True)
class Row:
    stage: str
    state: str  # queued | running | done | failed | cancelled | not started
    job_id: str
    log: str
    detail: str = ""


#: tries of ``squeue`` before its failure is an error (a busy controller answers some requests with nothing)
SQUEUE_TRIES = 5
SQUEUE_PAUSE_SECONDS = 2.0


class SchedulerUnreachable(KdreproError):
    """``squeue`` failed every time: the jobs' states are unknown (never read as "no jobs": that would call running
    jobs killed and let a waiting launcher go on)."""


def slurm_jobs() -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of every job the SLURM controller knows; empty without SLURM. Raises
    :class:`SchedulerUnreachable` when ``squeue`` keeps failing."""
    if shutil.which("squeue") is None:
        return {}
    for attempt in range(SQUEUE_TRIES):
        result = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r"], capture_output=True, text=True)
        if result.returncode == 0:
            break
        if attempt + 1 < SQUEUE_TRIES:
            time.sleep(SQUEUE_PAUSE_SECONDS)
    else:
        why = " ".join((result.stderr or result.stdout).split())[:160]
        raise SchedulerUnreachable(f"squeue failed {SQUEUE_TRIES} times ({why}); the jobs' states are unknown: "
                                   "run `kdrepro status` again when the SLURM controller answers")
    jobs = {}
    for line in result.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        jobs[job_id.strip()] = (state.strip(), reason.strip())
    return jobs


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def rows(root: Path) -> list[Row]:
    """One row per stage of the last launch, in submission order."""
    record = read_record(root)
    if record is None:
        return []
    slurm = slurm_jobs() if record["executor"] == "slurm" else {}
    launcher = _alive(record.get("launcher_pid")) if record["executor"] == "local" else False
    table = {stage: _row(root, stage, job, record["executor"], slurm, launcher) for stage, job in record["jobs"].items()}
    for stage, job in record["jobs"].items():  # in DVC's order: a stage's upstream rows are final before its own
        row = table[stage]
        blocked = [name for name in job["upstream"] if table[name].state in ("failed", "cancelled")]
        if row.state in ("queued", "not started", "cancelled") and blocked:
            table[stage] = Row(stage, "cancelled", row.job_id, row.log, f"upstream {', '.join(blocked)} failed")
    return list(table.values())


def _row(root: Path, stage: str, job: dict, executor: str, slurm: dict[str, tuple[str, str]], launcher: bool) -> Row:
    job_id, log = job.get("job_id") or "-", job.get("log") or "-"
    state = read_state(root, stage)
    if state is not None and state["state"] in ("done", "failed"):
        detail = "" if state["state"] == "done" else f"exit status {state.get('returncode')}"
        return Row(stage, state["state"], job_id, log, detail)
    if executor == "slurm":
        scheduler_state, reason = slurm.get(job_id, ("", ""))
        if scheduler_state in SLURM_ACTIVE:
            name = "queued" if scheduler_state == "PENDING" else "running"
            return Row(stage, name, job_id, log, reason if name == "queued" and reason != "None" else "")
        if state is not None:  # it started, never finished, and SLURM no longer runs it
            return Row(stage, "failed", job_id, log, f"killed ({scheduler_state or 'gone from the queue'})")
        return Row(stage, "cancelled", job_id, log, reason if reason and reason != "None" else scheduler_state or "not in the queue")
    if state is not None:
        return Row(stage, "running", job_id, log) if _alive(int(job_id)) else Row(stage, "failed", job_id, log, "killed")
    return Row(stage, "queued" if launcher else "not started", job_id, log)


def active_jobs(root: Path) -> list[str]:
    """Stages of the last launch still queued or running (a new launch must wait for them)."""
    return [row.stage for row in rows(root) if row.state in ("queued", "running")]


def format_rows(table: list[Row]) -> str:
    if not table:
        return "no launch yet: start one with `kdrepro launch --executor slurm` or `--executor local --workers N`"
    counts = {}
    for row in table:
        counts[row.state] = counts.get(row.state, 0) + 1
    lines = [f"{'stage':<28} {'state':<11} {'job':<8} log"]
    for row in table:
        lines.append(f"{row.stage:<28} {row.state:<11} {row.job_id:<8} {row.log}" + (f"  ({row.detail})" if row.detail else ""))
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    return "\n".join(lines)
