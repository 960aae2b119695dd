"""Does ``kdrepro launch --executor local --workers N`` pay against a plain ``dvc repro`` on this machine?

    python benchmarks/local_workers.py [--pairs 1] [--workers 2] [--threads 1] [--after STAGE ...] [stage ...]

Each run builds the smoke pipeline from nothing in a fresh copy of this repository (its tracked and untracked,
not ignored, files; the smoke profile with 2 seeds and kd, fitnet and cwd, as the pipeline tests use), either with
``dvc repro`` at the profile's threads (2) or with ``kdrepro launch --executor local --workers N`` at ``--threads``
per stage (the copy's profile edited), in ABBA order per pair (repro, launch, launch, repro) so that a drift of the
machine's other load falls on both alike. Printed per run: wall seconds and the CPU seconds of all its processes;
then launch / repro per pair and their median. Stage names limit both to those stages and their upstream. With
``--after``, those stages (and their upstream) are built once per setting of threads, untimed, and every run starts
from a copy of that tree: only the stages after them are timed (the per-seed training runs, where the parallelism
is). Writes
``benchmarks/results/local_workers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = {"profile": "smoke", "seeds": [0, 1], "methods": ["kd", "fitnet", "cwd"], "extended": {"multipliers": ["2"]}}
SKIPPED = ("data/", "runs/", "results/", "reports/", "logs/", "dvc.lock")


def copy_repository(destination: Path) -> Path:
    """The repository's files without data, runs, results, reports and dvc.lock, as a git repository (dvclive needs
    a commit)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    for name in files:
        if (REPO / name).is_file() and not name.startswith(SKIPPED):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    params = yaml.safe_load((destination / "params.yaml").read_text())
    (destination / "params.yaml").write_text(yaml.safe_dump({**params, **PARAMS}))
    git = ["git", "-c", "user.name=kdrepro-benchmark", "-c", "user.email=benchmark@localhost"]
    for command in ([*git, "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=destination, check=True)
    return destination


def set_threads(repo: Path, threads: int) -> None:
    profile = repo / "kdrepro" / "conf" / "profile" / "smoke.yaml"
    text, count = re.subn(r"^threads:\s*\S+", f"threads: {threads}", profile.read_text(), flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(f"error: no `threads:` line in {profile}; update benchmarks/local_workers.py")
    profile.write_text(text)


def environment(repo: Path) -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip


def build_base(folder: Path, after: list[str], threads: int | None) -> Path:
    """A copy (at ``threads``, None: the profile's) with ``after`` and their upstream built by ``dvc repro``."""
    folder.mkdir()
    repo = copy_repository(folder)
    if threads is not None:
        set_threads(repo, threads)
    result = subprocess.run([str(BIN / "dvc"), "repro", *after], cwd=repo, env=environment(repo), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: dvc repro {' '.join(after)} failed in {repo}:\n{(result.stdout + result.stderr)[-3000:]}")
    return repo


def run(kind: str, workers: int, threads: int, targets: list[str], base: Path | None = None) -> dict[str, float]:
    """One build (from nothing, or from a copy of ``base``); wall and CPU seconds (every process it started)."""
    with tempfile.TemporaryDirectory(prefix=f"kdrepro-{kind}-") as folder:
        if base is None:
            repo = copy_repository(Path(folder))
            if kind == "launch":
                set_threads(repo, threads)
        else:
            repo = Path(folder) / "repo"
            shutil.copytree(base, repo, symlinks=True, ignore=lambda d, names: ["tmp"] if Path(d).name == ".dvc" else [])
        if kind == "repro":
            command = [str(BIN / "dvc"), "repro", *targets]
        else:
            command = [str(BIN / "kdrepro"), "launch", *targets, "--executor", "local", "--workers", str(workers)]
        env = environment(repo)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(command[:2])} failed in {repo}:\n{(result.stdout + result.stderr)[-3000:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        load = os.getloadavg()[0]
        print(f"{kind:<7} wall {wall:7.1f} s   cpu {cpu:7.1f} s   load(1 min) at the end {load:.1f}", flush=True)
        return {"wall_seconds": wall, "cpu_seconds": cpu, "load_at_end": load}


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1, help="ABBA blocks: each is 2 repro and 2 launch runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage under launch")
    parser.add_argument("--after", nargs="*", default=[], help="stages built once, untimed, before every run")
    parser.add_argument("targets", nargs="*")
    options = parser.parse_args(arguments)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kdrepro-base-") as folder:
        bases = {kind: build_base(Path(folder) / kind, options.after, threads) if options.after else None
                 for kind, threads in (("repro", None), ("launch", options.threads))}
        for pair in range(options.pairs):
            for kind in ("repro", "launch", "launch", "repro"):
                measured = run(kind, options.workers, options.threads, options.targets, bases[kind])
                runs.append({"pair": pair, "kind": kind, **measured})
    ratios = []
    for pair in range(options.pairs):
        walls = {kind: sum(r["wall_seconds"] for r in runs if r["pair"] == pair and r["kind"] == kind) for kind in ("repro", "launch")}
        ratios.append(walls["launch"] / walls["repro"])
        print(f"block {pair}: launch / repro wall = {ratios[-1]:.3f}")
    cpu = {kind: sum(r["cpu_seconds"] for r in runs if r["kind"] == kind) for kind in ("repro", "launch")}
    print(f"median launch / repro wall = {statistics.median(ratios):.3f}; CPU seconds launch / repro = "
          f"{cpu['launch'] / cpu['repro']:.3f}")
    out = REPO / "benchmarks" / "results" / "local_workers.json"
    out.write_text(json.dumps({"workers": options.workers, "threads_per_stage": options.threads, "params": PARAMS,
                               "targets": options.targets, "after": options.after, "runs": runs, "wall_ratio_per_block": ratios}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
