"""``kdrepro launch``: submit the out-of-date stages of ``dvc.yaml`` as jobs (SLURM, or N local workers).

Both executors are submitit's: ``SlurmExecutor`` writes one ``sbatch`` script per stage (its resources, its
upstream jobs as ``--dependency=afterok:...`` with ``--kill-on-invalid-dep=yes``), so SLURM starts each stage when
its upstream succeeded, cancels what depends on a failed or cancelled job and lets every other branch go on, and the
launcher returns at once. ``LocalExecutor`` starts subprocesses on this machine; there the launcher waits and starts
each stage when its upstream is done, on at most N slots (GPUs handed out from the visible ones).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdrepro.cluster.dag import Plan, Stage, downstream, stages_to_run
from kdrepro.cluster.job import LOG_DIR, run_stage, state_path, write_record
from kdrepro.cluster.resources import Resources, cluster_config, stage_resources
from kdrepro.cluster.status import SchedulerUnreachable, active_jobs, rows
from kdrepro.errors import ConfigError

EXECUTORS = ("slurm", "local")
#: seconds between two looks at the SLURM queue while the launcher waits for an always-changed stage's job
POLL_SECONDS = 2.0
#: the launcher's lines appear at once, also in a log file or a pipe
say = functools.partial(print, flush=True)


def launch(root: Path, executor: str, workers: int | None, overrides: list[str], force: bool = False,
           echo: Callable[[str], None] = say, targets: list[str] | tuple[str, ...] = ()) -> int:
    """Submit every stage that must run (of ``targets`` and their upstream, if given); print one line per job (id,
    log). Returns the exit status."""
    from kdrepro.pipeline.params import read_params

    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use --executor slurm or --executor local")
    if executor == "slurm" and workers is not None:
        raise ConfigError("--workers is for --executor local; on SLURM the cluster decides how many jobs run at once")
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"no dvc.yaml in {root}; run kdrepro launch from the repository root")
    busy = active_jobs(root)
    if busy:
        raise ConfigError(
            f"the previous launch still has {len(busy)} job(s) queued or running ({', '.join(busy[:3])}...); "
            "see `kdrepro status`, wait for them or cancel them (scancel) first"
        )
    profile = read_params(root / "params.yaml").get("profile", "synthetic")
    config = cluster_config(str(profile), overrides)
    record: dict[str, Any] = {
        "executor": executor, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "launcher_pid": os.getpid(), "profile": profile, "workers": workers, "jobs": {},
    }
    ran: set[str] = set()
    while True:
        plan = stages_to_run(root, force, targets, ran)
        if not plan.stages:
            echo("nothing to run: every stage is up to date (dvc status is clean)" if not ran else
                 f"nothing else to run: {', '.join(sorted(ran))} left every stage after it up to date")
            return 0
        status = _run_round(root, executor, workers, config, plan, record, echo, force)
        if status != 0 or not plan.replan:
            return status
        ran |= {stage.name for stage in plan.stages if stage.always_changed}


def _run_round(root: Path, executor: str, workers: int | None, config: Any, plan: Plan, record: dict[str, Any],
               echo: Callable[[str], None], force: bool = False) -> int:
    """Submit (SLURM) or run (local) one round of stages; a round with an always-changed stage is waited for."""
    stages = plan.stages
    for stage in stages:
        state_path(root, stage.name).unlink(missing_ok=True)
    resources = {stage.name: stage_resources(config, stage.kind, stage.exclusive) for stage in stages}
    record["jobs"].update({s.name: {"upstream": list(s.upstream), "resources": asdict(resources[s.name]),
                                    "job_id": None, "log": None} for s in stages})
    write_record(root, record)
    echo(f"{len(stages)} stage(s) to run on {executor}" + (f" with {workers} worker(s)" if workers else "")
         + (f" first: {_always_note(stages)}" if plan.replan else ""))
    if executor == "local":
        return _run_local(root, stages, resources, record, workers or 1, echo, force)
    status = _submit_slurm(root, stages, resources, record, echo, force, final=not plan.replan)
    return status if status != 0 or not plan.replan else _wait_slurm(root, stages, echo)


def _always_note(stages: list[Stage]) -> str:
    names = ", ".join(stage.name for stage in stages if stage.always_changed)
    return (f"{names} is always changed; as under dvc repro, the stages after it are out of date only if its "
            "output changes, so the rest is planned when it is done")


def _wait_slurm(root: Path, stages: list[Stage], echo: Callable[[str], None]) -> int:
    """Wait until the round's SLURM jobs ended; 0 if all succeeded (the launch goes on), else 1."""
    names = {stage.name for stage in stages}
    while True:
        try:
            table = {row.stage: row for row in rows(root) if row.stage in names}
        except SchedulerUnreachable as error:  # a busy controller: its jobs are still there, ask again
            echo(f"still waiting: {error}")
            table = {}
        if table and not any(row.state in ("queued", "running") for row in table.values()):
            break
        time.sleep(POLL_SECONDS)
    failed = sorted(name for name, row in table.items() if row.state != "done")
    if failed:
        echo(f"{', '.join(failed)} did not finish ({'; '.join(f'log {table[n].log}' for n in failed)}); "
             "nothing else was submitted: fix it and launch again")
        return 1
    return 0


def _line(stage: str, job_id: str, resources: Resources, log: Path, root: Path, after: list[str]) -> str:
    waits = f"  after {','.join(after)}" if after else ""
    return f"{stage:<28} job {job_id:<8} {resources.describe():<34} log {log.relative_to(root)}{waits}"


def _slurm_parameters(stage: Stage, resources: Resources, upstream_ids: list[str]) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "job_name": stage.name, "cpus_per_task": resources.cpus, "mem": f"{math.ceil(resources.mem_gb * 1024)}M",
        "time": resources.time_min, "stderr_to_stdout": True, "signal_delay_s": 120,
    }
    if resources.gpus:
        parameters["gpus_per_node"] = resources.gpus
        if resources.gpu_type:
            parameters["constraint"] = resources.gpu_type
    if resources.partition:
        parameters["partition"] = resources.partition
    if resources.exclusive:
        parameters["exclusive"] = True
    if upstream_ids:
        parameters["dependency"] = "afterok:" + ":".join(upstream_ids)
        parameters["additional_parameters"] = {"kill_on_invalid_dep": "yes"}
    return parameters


def _submit_slurm(root: Path, stages: list[Stage], resources: dict[str, Resources], record: dict[str, Any],
                  echo: Callable[[str], None], force: bool = False, final: bool = True) -> int:
    import submitit

    executor = submitit.SlurmExecutor(folder=root / LOG_DIR / "jobs", max_num_timeout=0)
    ids: dict[str, str] = {}
    for stage in stages:
        after = [ids[name] for name in stage.upstream]
        executor.parameters.clear()  # one stage's dependency must not leak into the next
        executor.update_parameters(**_slurm_parameters(stage, resources[stage.name], after))
        job = executor.submit(run_stage, str(root), stage.name, resources[stage.name].gpus, force)
        ids[stage.name] = str(job.job_id)
        record["jobs"][stage.name].update(job_id=ids[stage.name], log=str(job.paths.stdout.relative_to(root)))
        write_record(root, record)
        echo(_line(stage.name, ids[stage.name], resources[stage.name], job.paths.stdout, root, after))
    echo("submitted; follow them with `kdrepro status`" if final else "waiting for it (`kdrepro status` shows it)")
    return 0


def _visible_gpus(needed: bool) -> list[int]:
    if not needed:
        return []
    import torch

    return list(range(torch.cuda.device_count()))


def _run_local(root: Path, stages: list[Stage], resources: dict[str, Resources], record: dict[str, Any],
               workers: int, echo: Callable[[str], None], force: bool = False) -> int:
    """Start each stage when its upstream is done, at most ``workers`` at once; wait for all of them."""
    import submitit

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    free = _visible_gpus(any(r.gpus for r in resources.values()))
    most = max(r.gpus for r in resources.values())
    if most > len(free):
        raise ConfigError(f"a stage asks for {most} GPU(s) but this machine shows {len(free)}; "
                          "lower gpus in kdrepro/conf/cluster/ (or launch gpus=N) or use --executor slurm")
    executor = submitit.LocalExecutor(folder=root / LOG_DIR / "jobs")
    exclusive = {name for name, need in resources.items() if need.exclusive}
    pending, running, done, failed, skipped = list(stages), {}, set(), [], set()
    try:
        while pending or running:
            for name, (job, gpus) in list(running.items()):
                if not job.done():
                    continue
                del running[name]
                free.extend(gpus)
                if job.exception() is None:
                    done.add(name)
                else:
                    failed.append(name)
                    waiting = downstream(stages, name)
                    skipped |= waiting
                    pending = [s for s in pending if s.name not in waiting]
                    echo(f"{name} failed (log {record['jobs'][name]['log']}); not started: {', '.join(sorted(waiting)) or 'nothing'}")
            for stage in _ready(pending, running, done, workers, exclusive):
                need = resources[stage.name]
                if need.gpus > len(free):
                    break
                gpus, free = free[:need.gpus], free[need.gpus:]
                executor.update_parameters(timeout_min=need.time_min, gpus_per_node=need.gpus, visible_gpus=tuple(gpus),
                                           stderr_to_stdout=True)
                job = executor.submit(run_stage, str(root), stage.name, need.gpus, force)
                running[stage.name] = (job, gpus)
                pending.remove(stage)
                record["jobs"][stage.name].update(job_id=str(job.job_id), log=str(job.paths.stdout.relative_to(root)))
                write_record(root, record)
                echo(_line(stage.name, str(job.job_id), need, job.paths.stdout, root, list(stage.upstream)))
            time.sleep(0.2)
    except KeyboardInterrupt:
        for job, _ in running.values():
            job.cancel(check=False)
        raise
    echo(f"{len(done)} done, {len(failed)} failed, {len(skipped)} not started because an upstream stage failed")
    return 1 if failed else 0


def _ready(pending: list[Stage], running: dict[str, Any], done: set[str], workers: int, exclusive: set[str]) -> list[Stage]:
    """Stages whose upstream is done, in DVC's order; an exclusive stage (the calibration) runs alone."""
    if exclusive & set(running):
        return []
    ready = [s for s in pending if all(name in done for name in s.upstream)]
    for stage in ready:
        if stage.name in exclusive:
            return [] if running else [stage]
    return ready[: max(0, workers - len(running))]
