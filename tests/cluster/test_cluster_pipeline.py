"""The smoke pipeline's iteration-matched branch through a real single-node SLURM and through 2 local workers,
against a sequential `dvc repro` of the same stages.

The stages: data, hardware (always changed: it runs first, as the upstream of the stages launched), pretrain, teacher, calibrate (a method's calibration entry is its config card), the student alone
and two KD methods at the reference schedule (TARGETS and their upstream; the rest of the pipeline goes through the same code, per stage). One sequential run, one SLURM
launch (its teacher job killed with scancel, then resubmitted) and one local launch, shared by all assertions; the
sequential run and the local launch start at once in the background, beside the SLURM test, so the module costs
about one run's time, not three. CI installs Debian's slurm-wlm and munge (.ci/run); without them the SLURM cases are
skipped with the exact reason (KDREPRO_REQUIRE_SLURM=1 fails them instead), the local case still runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kdrepro.analysis.results import collect_per_class, collect_runs
from kdrepro.cluster.job import read_state
from kdrepro.cluster.status import rows

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
# Passed here end to end on 2026-12-04 at 22:20 UTC (2 cores, beside a running pipeline): SLURM launch, kill and
# resubmission 79 s, sequential repro 82 s, local launch 86 s, the module 99 s.
pytestmark = pytest.mark.slow
PARAMS = {"profile": "smoke", "seeds": [0, 1], "methods": ["kd", "fitnet", "cwd"], "extended": {"multipliers": ["2"]},
          "calibrate": {"warmup": 1, "rounds": 1, "iterations_per_round": 1, "reference_method": None}}  # fmt: skip
TARGETS = ("student@iter_matched", "iter_matched@kd", "iter_matched@fitnet")
SPEED = {"precision": "fp32", "channels_last": "false", "threads": "1"}
LAUNCHED = {"data", "hardware", "pretrain", "teacher", "calibrate", *TARGETS}
TIMING = re.compile(r"second|time|hour|rss|memory|created|speed|throughput|phase_")


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


slurm = _module(HERE / "slurm.py", "kdrepro_test_slurm")
pipeline = _module(HERE.parent / "pipeline" / "test_dvc.py", "kdrepro_test_dvc")  # its repository copy


def _copy(tmp_path_factory, name: str) -> Path:
    """A repository copy with PARAMS and the speed settings fixed (SPEED): on a loaded machine the hardware stage's
    measured choice of `auto` can differ between copies (seen: NCHW in one, channels_last in another), and the
    identity of the rows needs the same settings everywhere; the stage still runs, deciding from the config."""
    repo = pipeline._copy_repository(tmp_path_factory.mktemp(name))
    pipeline._write_params(repo, **PARAMS)
    profile = repo / "kdrepro" / "conf" / "profile" / "smoke.yaml"
    text = profile.read_text()
    for key, value in SPEED.items():
        text, found = re.subn(rf"^{key}:[^\n#]*", f"{key}: {value}  ", text, flags=re.MULTILINE)
        assert found == 1, f"no `{key}:` line in {profile}"
    profile.write_text(text)
    return repo


def _environment(repo: Path, env: dict | None) -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(repo), **(env or {})}  # fmt: skip


def _run(repo: Path, *command: str, env: dict | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=repo, capture_output=True, text=True, env=_environment(repo, env), timeout=timeout)


class Background:
    """A command started now in its own process group, its output in a file; :meth:`finish` waits for it."""

    def __init__(self, repo: Path, *command: str) -> None:
        self.repo, self.started, self.log = repo, time.monotonic(), repo.parent / f"{repo.name}.log"
        with self.log.open("w") as output:
            self.process = subprocess.Popen(list(command), cwd=repo, stdout=output, stderr=subprocess.STDOUT,
                                            env=_environment(repo, None), start_new_session=True)

    def finish(self, timeout: float = 5400) -> tuple[str, float]:
        self.process.wait(timeout=timeout)
        output = self.log.read_text()
        assert self.process.returncode == 0, output[-3000:]
        return output, time.monotonic() - self.started

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=60)


def _launch(repo: Path, *arguments: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    result = _run(repo, str(BIN / "kdrepro"), "launch", *arguments, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = dict(re.findall(r"^(\S+)\s+job (\S+)\s", result.stdout, re.MULTILINE))
    for stage, job_id in jobs.items():  # every job line names its log file
        assert re.search(rf"^{re.escape(stage)}\s+job {job_id}\s.*log logs/cluster/jobs/{job_id}_0_log.out", result.stdout, re.M)
    return result, jobs


def _wait_until_idle(repo: Path, env: dict, timeout: float = 5400) -> dict[str, str]:
    os.environ.update(env)  # squeue inside rows() reads SLURM_CONF
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = {row.stage: row.state for row in rows(repo)}
        if not any(state in ("queued", "running") for state in table.values()):
            return table
        time.sleep(2)
    raise AssertionError(f"jobs still queued or running after {timeout:.0f} s: {table}")


def _same_iteration_matched_rows(repo: Path, reference: Path) -> None:
    """The rows `kdrepro results` writes to runs.csv and per_class.csv, timing columns aside, are identical."""
    decisions = [(folder / "runs" / "smoke" / "hardware.json").read_text() for folder in (repo, reference)]
    assert decisions[0] == decisions[1], f"the hardware stage decided differently on the same machine: {decisions}"
    tables = []
    for folder in (repo, reference):
        runs = collect_runs(folder / "runs" / "smoke")
        runs = runs[runs.protocol == "iter_matched"].reset_index(drop=True)
        tables.append((runs[[column for column in runs.columns if not TIMING.search(column)]],
                       collect_per_class(folder / "runs" / "smoke")))  # fmt: skip
    runs = tables[0][0]
    assert sorted(set(runs.method)) == ["fitnet", "kd", "none"] and len(runs) == 3 * len(PARAMS["seeds"])
    pd.testing.assert_frame_equal(tables[0][0], tables[1][0])
    pd.testing.assert_frame_equal(tables[0][1], tables[1][1])


def _lock_without_hardware(repo: Path) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"].pop("hardware")
    return lock


def _clean_and_idle(repo: Path, env: dict | None = None) -> None:
    """`dvc status` clean, a second launch submits nothing, and `dvc repro` runs only what it runs every time (the
    always-changed hardware stage, which decides as before) and records the same dvc.lock."""
    status = _run(repo, str(BIN / "dvc"), "status", *TARGETS, env=env)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout[-2000:]
    again, jobs = _launch(repo, *TARGETS, *(["--executor", "local"] if env is None else []), env=env)
    assert jobs == {} and "nothing to run" in again.stdout, again.stdout
    lock, decision = _lock_without_hardware(repo), (repo / "runs" / "smoke" / "hardware.json").read_bytes()
    repro = _run(repo, str(BIN / "dvc"), "repro", *TARGETS, env=env)
    ran = set(re.findall(r"^Running stage '([^']+)'", repro.stdout, re.MULTILINE))
    assert repro.returncode == 0 and ran == {"hardware"}, repro.stdout[-2000:]
    assert (repo / "runs" / "smoke" / "hardware.json").read_bytes() == decision
    assert _lock_without_hardware(repo) == lock  # dvc.lock already recorded what dvc repro records


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """A sequential `dvc repro` and a local launch with 2 workers, both started now."""
    runs = {"sequential": Background(_copy(tmp_path_factory, "sequential"), str(BIN / "dvc"), "repro", *TARGETS),
            "local": Background(_copy(tmp_path_factory, "local"), str(BIN / "kdrepro"), "launch", *TARGETS, "--executor",
                                "local", "--workers", "2")}  # fmt: skip
    yield runs
    for run in runs.values():
        run.stop()


@pytest.fixture(scope="module")
def sequential(background) -> Path:
    _, seconds = background["sequential"].finish()
    print(f"\nsequential dvc repro of the smoke stages: {seconds:.0f} s")
    return background["sequential"].repo


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    reason = slurm.why_not()
    if reason is None:
        folder = tmp_path_factory.mktemp("slurm")
        started = time.monotonic()
        try:
            env = slurm.start(folder)
        except RuntimeError as error:
            reason = str(error)
        else:
            print(f"\nsingle-node SLURM up in {time.monotonic() - started:.1f} s")
            yield env
            slurm.stop(folder)
            return
    if os.environ.get("KDREPRO_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM cannot start: {reason}")
    pytest.skip(f"SLURM cannot start: {reason}")


def test_slurm_launch_matches_sequential_repro_and_a_killed_job_resumes(background, slurm_env, tmp_path_factory, request):
    repo = _copy(tmp_path_factory, "slurm")
    started = time.monotonic()
    first, jobs = _launch(repo, *TARGETS, "--executor", "slurm", env=slurm_env)
    assert set(jobs) == LAUNCHED
    assert "hardware is always changed" in first.stdout  # it ran first, then the rest was planned

    deadline = time.monotonic() + 3600  # kill the teacher's job once it runs
    while (read_state(repo, "teacher") or {}).get("state") != "running":
        assert time.monotonic() < deadline and (read_state(repo, "teacher") or {}).get("state") != "done"
        time.sleep(0.2)
    assert _run(repo, "scancel", jobs["teacher"], env=slurm_env).returncode == 0
    states = _wait_until_idle(repo, slurm_env)
    assert states["teacher"] == "failed"
    held_back = {"iter_matched@kd", "iter_matched@fitnet"}
    assert all(states[stage] == "cancelled" for stage in held_back), states
    # other branches ran on, the calibration too: it times the teacher's architecture, not its weights
    assert states["student@iter_matched"] == states["data"] == states["pretrain"] == states["calibrate"] == "done"

    second, resubmitted = _launch(repo, *TARGETS, "--executor", "slurm", env=slurm_env)
    assert set(resubmitted) == {"hardware", "teacher", *held_back}  # hardware: the upstream of the teacher
    assert not {"data", "pretrain", "student@iter_matched"} & set(resubmitted)  # finished stages stay finished
    states = _wait_until_idle(repo, slurm_env)
    assert set(states.values()) == {"done"}, states
    print(f"\nSLURM launch, kill and resubmission of the smoke stages: {time.monotonic() - started:.0f} s")
    sequential = request.getfixturevalue("sequential")  # started beside this test; waited for only now
    _same_iteration_matched_rows(repo, sequential)
    _clean_and_idle(repo, slurm_env)


def test_local_workers_match_sequential_repro(background, sequential):
    output, seconds = background["local"].finish()
    repo = background["local"].repo
    jobs = dict(re.findall(r"^(\S+)\s+job (\S+)\s", output, re.MULTILINE))
    assert "0 failed" in output and set(jobs) == LAUNCHED
    assert all(f"logs/cluster/jobs/{job}_0_log.out" in output for job in jobs.values())
    print(f"\nlocal launch (2 workers) of the smoke stages: {seconds:.0f} s")
    _same_iteration_matched_rows(repo, sequential)
    _clean_and_idle(repo)
