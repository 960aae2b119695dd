"""The smoke pipeline in a copy of the repository: helpers for the tests that run `dvc`, and the one finished run
they share (``tests/conftest.py``: the session fixture ``finished_smoke`` runs it once, ``smoke_copy`` gives a test
its own copy of the finished tree).

A copy of a finished tree is up to date for DVC: every path in ``dvc.yaml``, ``dvc.lock`` and a run folder's
``config.yaml`` / ``inputs.json`` is relative to the repository root, and ``.dvc/cache`` travels with it (DVC only
re-hashes the copied files once, since their inodes are new).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Hydra overrides for a test whose calibration is only a means to its subject: one or two iterations a round cannot
#: tell other load from noise, so neither disturbance check may ask for a re-measurement, which would add progress
#: lines and time (the checks have their own tests in tests/train/test_calibrate.py).
UNGUARDED = ["calibrate.max_spread=null", "calibrate.max_flop_deviation=null"]
#: params.yaml of the shared finished smoke run: two seeds (the statistics need them), the canonical methods the
#: extended runs need, one segmentation-specific method, the README's plugin method, one extended budget, and the
#: cheapest calibration (the smoke profile never flags a calibration as disturbed: max_spread null).
SMOKE_PARAMS: dict[str, Any] = {
    "profile": "smoke",
    "seeds": [0, 1],
    "methods": ["kd", "fitnet", "cwd", "mymethod"],
    "calibrate": {"warmup": 1, "rounds": 1, "iterations_per_round": 2, "reference_method": None, "max_spread": None},
    "extended": {"multipliers": ["2"]},
    "plugins": "my_methods",
}


def copy_repository(destination: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files (no data, runs, results or reports) in
    ``destination``, committed to a fresh git repository (dvclive needs a commit)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in files.stdout.split():
        if (REPO / name).is_file() and name != "dvc.lock" and not name.startswith(("data/", "runs/", "results/", "reports/")):
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)
    git = ["git", "-c", "user.name=kdrepro-test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=destination, check=True)
    subprocess.run([*git, "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=destination, check=True)
    return destination


def dvc(repo: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``dvc <arguments>`` in ``repo``, running the copy's own kdrepro package and configs (PYTHONPATH), not the
    installed one."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    return subprocess.run([str(BIN / "dvc"), *arguments], cwd=repo, capture_output=True, text=True, env=env)


def write_params(repo: Path, **changes: Any) -> None:
    """Replace top-level keys of ``repo``'s params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def readme_plugin(repo: Path) -> None:
    """Write the README's "Your own KD method" files into ``repo``'s ``my_methods/`` (outside the package)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own KD method"):]
    files = [block.split("\n", 1)[1] for block in section.split("```")[1::2]]
    files = [body for body in files if body.startswith("# my_methods/")]
    assert len(files) == 2, "the README shows my_methods/mymethod.py and my_methods/method/mymethod.yaml"
    for body in files:
        target = repo / body.splitlines()[0][2:].strip()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)


def ran_stages(result: subprocess.CompletedProcess) -> set[str]:
    """The stages a `dvc repro` ran (its "Running stage '<name>'" lines)."""
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}


def run_finished_smoke(destination: Path) -> Path:
    """A repository copy in ``destination`` with :data:`SMOKE_PARAMS` and the README's plugin, `dvc repro` run to
    the end (about two minutes on 2 cores)."""
    repo = copy_repository(destination)
    readme_plugin(repo)
    write_params(repo, **SMOKE_PARAMS)
    done = dvc(repo, "repro")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return repo


def copy_finished(source: Path, destination: Path) -> Path:
    """A copy of the finished tree ``source`` (git, DVC cache, runs, results, reports) at ``destination``."""
    shutil.copytree(source, destination, symlinks=True, ignore=_dvc_tmp)
    return destination


def _dvc_tmp(folder: str, names: list[str]) -> list[str]:
    """DVC's lock and state files (``.dvc/tmp``) stay behind: each copy starts its own."""
    return ["tmp"] if Path(folder).name == ".dvc" else []
