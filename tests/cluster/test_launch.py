"""`kdrepro launch` / `kdrepro status` without a scheduler: stage kinds, resources, SLURM flags, local ordering,
status rows, torchrun inside a job (fast; the real SLURM and local runs are in test_cluster_pipeline.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kdrepro.cli import main, torchrun_argv
from kdrepro.cluster.dag import Stage, downstream
from kdrepro.cluster.job import record_path, write_state
from kdrepro.cluster.launch import _ready, _slurm_parameters
from kdrepro.cluster.resources import cluster_config, stage_resources
from kdrepro.cluster.status import format_rows, rows
from kdrepro.errors import ConfigError

CHAIN = [
    Stage("data", "kdrepro prepare --params params.yaml", ()),
    Stage("teacher", "kdrepro teacher --params params.yaml out_dir=runs/x/teacher", ("data",)),
    Stage("calibrate", "kdrepro calibrate --params params.yaml runs_dir=runs/x", ("teacher",)),
    Stage("student@iter_matched", "kdrepro train --params params.yaml method=none", ("data",)),
    Stage("compute_matched@kd", "kdrepro train --params params.yaml method=kd budget=calibrated", ("calibrate",)),
    Stage("results", "kdrepro results --params params.yaml", ("compute_matched@kd", "student@iter_matched")),
]


def test_stage_kinds_follow_the_kdrepro_command():
    kinds = {stage.name: stage.kind for stage in CHAIN}
    assert kinds == {"data": "light", "teacher": "train", "calibrate": "train", "student@iter_matched": "train",
                     "compute_matched@kd": "train", "results": "light"}  # fmt: skip
    assert Stage("pretrain", "kdrepro pretrain --params params.yaml", ()).kind == "single"
    assert Stage("report@cost", "papermill notebooks/cost.ipynb out.ipynb", ()).kind == "light"
    assert [stage.name for stage in CHAIN if stage.exclusive] == ["calibrate"]


def test_a_failed_stage_holds_back_exactly_its_downstream():
    assert downstream(CHAIN, "teacher") == {"calibrate", "compute_matched@kd", "results"}
    assert downstream(CHAIN, "student@iter_matched") == {"results"}


def test_profile_resources_and_overrides():
    cityscapes = cluster_config("cityscapes", ["gpu_type=a100", "partition=gpu"])
    train = stage_resources(cityscapes, "train", exclusive=True)
    assert (train.gpus, train.gpu_type, train.partition, train.exclusive) == (4, "a100", "gpu", True)
    assert stage_resources(cityscapes, "single").gpus == 1
    assert stage_resources(cityscapes, "light").gpus == 0
    smoke = stage_resources(cluster_config("smoke"), "train")
    assert (smoke.gpus, smoke.cpus, smoke.mem_gb) == (0, 1, 1)
    assert stage_resources(cluster_config("a_profile_without_its_own_file"), "train").cpus == 2  # the defaults


@pytest.mark.parametrize("override, message", [("gpu=2", "known keys: gpus"), ("cpus=0", "cpus=0 must be a number >= 1")])
def test_bad_cluster_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        cluster_config("smoke", [override])
    assert "\n" not in str(error.value)


def test_slurm_flags_carry_resources_dependencies_and_the_gpu_constraint():
    resources = stage_resources(cluster_config("cityscapes", ["gpu_type=h100"]), "train", exclusive=True)
    flags = _slurm_parameters(CHAIN[2], resources, ["11", "12"])
    assert flags["dependency"] == "afterok:11:12" and flags["additional_parameters"] == {"kill_on_invalid_dep": "yes"}
    assert (flags["gpus_per_node"], flags["constraint"], flags["exclusive"], flags["time"]) == (4, "h100", True, 1440)
    assert flags["job_name"] == "calibrate" and flags["mem"] == "65536M"
    light = _slurm_parameters(CHAIN[0], stage_resources(cluster_config("cityscapes"), "light"), [])
    assert "dependency" not in light and "gpus_per_node" not in light and "constraint" not in light


def test_local_slots_run_ready_stages_and_the_calibration_alone():
    exclusive = {"calibrate"}
    assert [s.name for s in _ready(CHAIN, {}, set(), 2, exclusive)] == ["data"]
    pending = CHAIN[1:]
    ready = _ready(pending, {}, {"data"}, 2, exclusive)
    assert [s.name for s in ready] == ["teacher", "student@iter_matched"]
    pending = [s for s in pending if s.name != "teacher"]
    assert _ready(pending, {"student@iter_matched": None}, {"data", "teacher"}, 2, exclusive) == []  # waits to run alone
    assert [s.name for s in _ready(pending, {}, {"data", "teacher"}, 2, exclusive)] == ["calibrate"]
    assert _ready(pending[1:], {"calibrate": None}, {"data", "teacher"}, 2, exclusive) == []


def test_torchrun_inside_a_job_for_several_gpus():
    argv = ["train", "--params", "params.yaml", "method=kd"]
    command = torchrun_argv(argv, {"KDREPRO_NPROC_PER_NODE": "4"})
    assert command is not None and command[1:] == ["--standalone", "--nproc_per_node=4", "-m", "kdrepro", *argv]
    assert Path(command[0]).name == "torchrun"
    assert torchrun_argv(argv, {}) is None
    assert torchrun_argv(argv, {"KDREPRO_NPROC_PER_NODE": "4", "WORLD_SIZE": "4"}) is None  # already under torchrun
    assert torchrun_argv(["results", "--params", "params.yaml"], {"KDREPRO_NPROC_PER_NODE": "4"}) is None


def test_status_reads_state_files_and_cancels_the_downstream_of_a_failure(tmp_path, capsys, monkeypatch):
    jobs = {s.name: {"upstream": list(s.upstream), "job_id": None, "log": None} for s in CHAIN}
    for number, name in enumerate(["data", "teacher", "student@iter_matched"]):
        jobs[name].update(job_id=str(900000 + number), log=f"logs/cluster/jobs/{900000 + number}_0_log.out")
    record_path(tmp_path).parent.mkdir(parents=True)
    record_path(tmp_path).write_text(json.dumps({"executor": "local", "launcher_pid": 0, "jobs": jobs}))
    write_state(tmp_path, "data", "done", returncode=0)
    write_state(tmp_path, "teacher", "failed", returncode=1)
    states = {row.stage: (row.state, row.detail) for row in rows(tmp_path)}
    assert states["data"] == ("done", "") and states["teacher"] == ("failed", "exit status 1")
    assert states["calibrate"] == ("cancelled", "upstream teacher failed")
    assert states["compute_matched@kd"] == ("cancelled", "upstream calibrate failed")
    assert states["student@iter_matched"][0] == "not started"  # the launcher is gone, nothing ran it
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "logs/cluster/jobs/900001_0_log.out" in out and "1 done" in out and "1 failed" in out
    assert format_rows([]).startswith("no launch yet")


def test_launch_refuses_bad_arguments_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--executor", "pbs"]) == 2
    assert main(["launch", "--executor", "slurm", "--workers", "4"]) == 2
    assert main(["launch", "--executor", "local"]) == 2  # no dvc.yaml here
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "use --executor slurm or --executor local" in errors[0]
    assert "--workers is for --executor local" in errors[1] and "run kdrepro launch from the repository root" in errors[2]


def test_an_unknown_target_stage_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the repository's own dvc.yaml; nothing is submitted
    assert main(["launch", "iter_matched@nope", "--executor", "local"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: no stage named iter_matched@nope in dvc.yaml; `dvc stage list` shows the names"


def test_a_failing_squeue_is_retried_and_never_read_as_an_empty_queue(monkeypatch):
    from kdrepro.cluster import status

    answers = iter([subprocess.CompletedProcess([], 1, "", "Zero Bytes were transmitted or received")] * 2
                   + [subprocess.CompletedProcess([], 0, "12|RUNNING|None\n", "")])  # fmt: skip
    monkeypatch.setattr(status.shutil, "which", lambda name: "/usr/bin/squeue")
    monkeypatch.setattr(status.subprocess, "run", lambda *a, **k: next(answers))
    monkeypatch.setattr(status, "SQUEUE_PAUSE_SECONDS", 0.0)
    assert status.slurm_jobs() == {"12": ("RUNNING", "None")}  # the third try answered
    monkeypatch.setattr(status.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess([], 1, "", "timed out"))
    with pytest.raises(status.SchedulerUnreachable, match="squeue failed 5 times \\(timed out\\)") as error:
        status.slurm_jobs()
    assert "\n" not in str(error.value)
