"""Does ``kdrepro launch --executor local --workers N`` pay against a plain ``dvc repro`` on this machine?

    python benchmarks/local_workers.py [--pairs 1] [--together] [--workers 2] [--threads 1] [--after STAGE]...
        [--json PATH] [stage ...]

Each run builds the smoke pipeline from nothing in a fresh copy of this repository (its tracked and untracked,
not ignored, files; the smoke profile with 2 seeds and kd, fitnet and cwd, as the pipeline tests use), either with
``dvc repro`` at the profile's threads (2) or with ``kdrepro launch --executor local --workers N`` at ``--threads``
per stage (the copy's profile edited). A block is ABBA in a row (repro, launch, launch, repro), so that a drift of
the machine's other load falls on both alike, or with ``--together`` one repro and one launch at the same time (each
under the other's load as well). Printed per run: wall seconds and the CPU seconds of all its processes; then
launch / repro per block and their median. Stage names limit both to those stages and their upstream. With
``--after``, those stages (and their upstream) are built once per setting of threads, untimed, and every run starts
from a copy of that tree: only the stages after them are timed (the per-seed training runs, where the parallelism
is). Writes ``benchmarks/results/local_workers.json`` (``--json``: that file instead).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def prepare(kind: str, folder: Path, threads: int, base: Path | None) -> Path:
    """The repository a run builds in: a fresh copy (``launch``: at ``threads``), or a copy of ``base``."""
    if base is not None:
        repo = folder / "repo"
        shutil.copytree(base, repo, symlinks=True, ignore=lambda d, names: ["tmp"] if Path(d).name == ".dvc" else [])
        return repo
    repo = copy_repository(folder)
    if kind == "launch":
        set_threads(repo, threads)
    return repo


def measure(kind: str, repo: Path, workers: int, targets: list[str]) -> dict[str, float]:
    """Wall seconds and CPU seconds (the process and every process it waited for) of one build in ``repo``."""
    if kind == "repro":
        command = [str(BIN / "dvc"), "repro", *targets]
    else:
        command = [str(BIN / "kdrepro"), "launch", *targets, "--executor", "local", "--workers", str(workers)]
    log = repo.parent / f"{kind}.log"
    with log.open("w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=repo, env=environment(repo), stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(command[:2])} failed in {repo}:\n{log.read_text()[-3000:]}")
    cpu, load = usage.ru_utime + usage.ru_stime, os.getloadavg()[0]
    print(f"{kind:<7} wall {wall:7.1f} s   cpu {cpu:7.1f} s   load(1 min) at the end {load:.1f}", flush=True)
    return {"wall_seconds": wall, "cpu_seconds": cpu, "load_at_end": load}


def block(options: argparse.Namespace, bases: dict[str, Path | None], number: int) -> list[dict[str, Any]]:
    """ABBA in a row, or (``--together``) one repro and one launch at the same time."""
    kinds = ("repro", "launch") if options.together else ("repro", "launch", "launch", "repro")
    with tempfile.TemporaryDirectory(prefix="kdrepro-workers-") as folder:
        jobs = []
        for number_in_block, kind in enumerate(kinds):
            (Path(folder) / str(number_in_block)).mkdir()
            jobs.append((kind, prepare(kind, Path(folder) / str(number_in_block), options.threads, bases[kind])))
        if options.together:
            with ThreadPoolExecutor(len(jobs)) as pool:
                results = list(pool.map(lambda job: measure(*job, options.workers, options.targets), jobs))
        else:
            results = [measure(kind, repo, options.workers, options.targets) for kind, repo in jobs]
    return [{"block": number, "kind": kind, **result} for kind, result in zip(kinds, results, strict=True)]


def arguments_parser() -> argparse.ArgumentParser:
    """The command line (``--after`` takes one stage and repeats, so stages to time can follow it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1, help="blocks: ABBA (2 repro, 2 launch) or, --together, AB")
    parser.add_argument("--together", action="store_true", help="run repro and launch of a block at the same time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage under launch")
    parser.add_argument("--after", action="append", default=[], metavar="STAGE",
                        help="a stage built once, untimed, before every run; repeat it for several (it takes one name, "
                             "so the stages to time can follow)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "local_workers.json",
                        help="where the runs and ratios go (default benchmarks/results/local_workers.json)")
    parser.add_argument("targets", nargs="*")
    return parser


def main(arguments: list[str]) -> int:
    options = arguments_parser().parse_args(arguments)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdrepro-base-") as folder:
        bases = {kind: build_base(Path(folder) / kind, options.after, threads) if options.after else None
                 for kind, threads in (("repro", None), ("launch", options.threads))}
        for number in range(options.pairs):
            runs.extend(block(options, bases, number))
    ratios = []
    for number in range(options.pairs):
        walls = {kind: sum(r["wall_seconds"] for r in runs if r["block"] == number and r["kind"] == kind) for kind in ("repro", "launch")}
        ratios.append(walls["launch"] / walls["repro"])
        print(f"block {number}: launch / repro wall = {ratios[-1]:.3f}")
    cpu = {kind: sum(r["cpu_seconds"] for r in runs if r["kind"] == kind) for kind in ("repro", "launch")}
    print(f"median launch / repro wall = {statistics.median(ratios):.3f}; CPU seconds launch / repro = "
          f"{cpu['launch'] / cpu['repro']:.3f}")
    out = options.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"workers": options.workers, "threads_per_stage": options.threads, "params": PARAMS,
                               "together": options.together, "targets": options.targets, "after": options.after,
                               "runs": runs, "wall_ratio_per_block": ratios}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
