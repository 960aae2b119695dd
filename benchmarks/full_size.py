"""The real profiles' own stages at full size on this machine: ``python benchmarks/full_size.py [--profiles ...]``.

For each profile (``cityscapes``, ``ade20k``) in a work folder: write a small fake dataset at the real resolutions
and layout (``benchmarks/fake_trees.py``), ``kdrepro prepare`` it, import a full-width PSPNet-R101 teacher from an
mmsegmentation-format checkpoint (``kdrepro teacher teacher_import=...``), calibrate every method (a couple of
iterations), train each method for a few iterations at the profile's crop (512×1024 / 512×512) with batch 2 (every
run ends with the whole-image evaluation at the test scale: 2048×1024 / ADE short side 512), evaluate one checkpoint
again on its own, and collect the results. Every step is a separate process; its wall time and peak resident memory
(``wait4``'s ``ru_maxrss``) are recorded, with its CPU seconds (user + system), which a machine shared with other
processes inflates less than wall time. Writes ``<work>/full_size.json`` and prints a markdown table.

``tests/scale/test_full_size.py`` runs a subset of these steps in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("kd", "fitnet", "cirkd", "afdcd", "skd")
#: makes ``fake_trees`` (beside this file) importable in a step's ``python -c``
SUPPORT = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "


@dataclass
class Step:
    profile: str
    name: str
    argv: list[str]
    result: dict = field(default_factory=dict)


def _kdrepro(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdrepro", *args]


def profile_steps(profile: str, work: Path, methods: tuple[str, ...] = METHODS, iterations: int = 1,
                  calibrate_methods: tuple[str, ...] | None = None, extra: tuple[str, ...] = (),
                  evaluate_again: bool = True, progress_seconds: float = 30.0) -> list[Step]:  # fmt: skip
    """The stages of one profile as commands (batch 2, the profile's crop, model widths and memory banks)."""
    from kdrepro.pipeline.layout import run_path

    data, runs = work / "data" / profile, work / "runs" / profile
    backbone = runs / "pretrain" / "student" / "backbone.pth"  # the student's ImageNet weights, imported below
    common = [f"profile={profile}", f"dataset.root={data}", "loader.batch_size=2", "loader.num_workers=0", "threads=2",
              "log_every=1", f"progress.every_seconds={progress_seconds}", f"student.pretrained={backbone}",
              "teacher.pretrained=null", *extra]  # fmt: skip
    teacher = runs / "teacher" / "checkpoint.pt"
    writer = "write_cityscapes_tree" if profile == "cityscapes" else "write_ade20k_tree"
    classes = 19 if profile == "cityscapes" else 150
    steps = [
        Step(profile, "fake dataset", [sys.executable, "-c", f"{SUPPORT}from fake_trees import {writer}; {writer}({str(data)!r})"]),
        Step(profile, "prepare / validate", _kdrepro("prepare", *common)),
        Step(profile, "mmseg checkpoint (R101)", [sys.executable, "-c", (
            f"{SUPPORT}from kdrepro.config import load_config; from omegaconf import OmegaConf; "
            "from fake_trees import write_mmseg_checkpoint; "
            f"cfg = load_config(['profile={profile}', 'teacher.pretrained=null']); "
            f"write_mmseg_checkpoint({str(work / f'mmseg_{profile}.pth')!r}, OmegaConf.to_container(cfg.teacher), {classes})")]),
        Step(profile, "teacher import", _kdrepro("teacher", *common, f"teacher_import={work / f'mmseg_{profile}.pth'}",
                                                 f"out_dir={runs / 'teacher'}")),
        Step(profile, "ImageNet backbone (R18, fake)", [sys.executable, "-c", (
            f"{SUPPORT}from kdrepro.config import load_config; from omegaconf import OmegaConf; "
            "from fake_trees import write_imagenet_backbone; "
            f"cfg = load_config(['profile={profile}', 'student.pretrained=null']); "
            f"write_imagenet_backbone({str(work / 'resnet18_v1c.pth')!r}, OmegaConf.to_container(cfg.student))")]),
        Step(profile, "pretrain (ImageNet import)", _kdrepro("pretrain", *common, "which=student",
                                                             f"pretrain.source.student={work / 'resnet18_v1c.pth'}",
                                                             f"out_dir={runs / 'pretrain'}")),
    ]  # fmt: skip
    with_teacher = [*common, f"teacher_checkpoint={teacher}"]
    if calibrate_methods:
        steps.append(Step(profile, f"calibrate ({len(calibrate_methods)} methods, 1+1 it each)", _kdrepro(
            "calibrate", *with_teacher, f"calibrate.methods=[{','.join(calibrate_methods)}]", "calibrate.warmup=0",
            "calibrate.rounds=1", "calibrate.iterations_per_round=1", f"calibrate.output={runs / 'calibration.json'}")))  # fmt: skip
    for method in methods:
        out = run_path(runs, "iter_matched", method, seed=0)
        steps.append(Step(profile, f"train {method} ({iterations} it) + evaluation", _kdrepro(
            "train", *with_teacher, f"method={method}", "budget=iterations", f"budget.iterations={iterations}",
            f"out_dir={out}")))  # fmt: skip
    if methods and evaluate_again:
        checkpoint = run_path(runs, "iter_matched", methods[0], seed=0) / "checkpoint.pt"
        steps.append(Step(profile, "evaluate (whole image, test scale)", _kdrepro(
            "evaluate", *common, f"evaluate.checkpoint={checkpoint}")))  # fmt: skip
    if methods:
        steps.append(Step(profile, "results", _kdrepro("results", *common, f"runs_dir={runs}",
                                                       f"results_dir={work / 'results' / profile}")))  # fmt: skip
    return steps


def run_step(step: Step, log: Path, progress_seconds: float = 30.0) -> dict:
    """Run one step; record seconds, peak RSS (bytes) and the exit status. Raises on failure (log tail attached).

    Every ``progress_seconds`` while it runs, print the step's latest progress line from its log (stage, method,
    seed, step / total, it/s, ETA, loss: kdrepro writes one at that interval when its stderr is a file)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    with open(log, "w") as handle:
        start = time.perf_counter()
        process = subprocess.Popen(step.argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
        status, usage = _wait(process.pid, log, start, progress_seconds)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    step.result = {"profile": step.profile, "step": step.name, "seconds": round(seconds, 1),
                   "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
                   "returncode": process.returncode}  # fmt: skip
    if process.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{step.profile}: {step.name} failed with status {process.returncode}:\n{tail}")
    return step.result


def _wait(pid: int, log: Path, start: float, progress_seconds: float) -> tuple[int, Any]:
    """``os.wait4`` of ``pid``, printing the latest progress line of ``log`` every ``progress_seconds``."""
    last_print = start
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        time.sleep(min(0.5, progress_seconds))
        now = time.perf_counter()
        if now - last_print >= progress_seconds:
            print(f"    {now - start:.0f} s: {latest_progress(log) or 'no progress line yet'}", flush=True)
            last_print = now


def latest_progress(log: Path) -> str | None:
    """The last ``... Iter [k/n] ...`` line kdrepro wrote to ``log`` (its logger prefix removed)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if " Iter [" in line]
    return lines[-1].split("kdrepro.progress: ", 1)[-1] if lines else None


def table(results: list[dict]) -> str:
    lines = ["| profile | step | wall s | CPU s | peak RSS (GiB) |", "|---|---|---|---|---|"]
    for row in results:
        cpu = f"{row['cpu_seconds']:.1f}" if "cpu_seconds" in row else "—"
        lines.append(f"| {row['profile']} | {row['step']} | {row['seconds']:.1f} | {cpu} | {row['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["cityscapes", "ade20k"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--calibrate", nargs="*", default=["none", *METHODS], help="methods to calibrate (none: skip)")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/full_size_work"))
    parser.add_argument("--progress-seconds", type=float, default=30.0, help="progress line interval (default 30 s)")
    arguments = parser.parse_args(argv)
    results: list[dict] = []
    output = arguments.work / "full_size.json"
    for profile in arguments.profiles:
        steps = profile_steps(profile, arguments.work, tuple(arguments.methods), arguments.iterations,
                              tuple(arguments.calibrate) or None, progress_seconds=arguments.progress_seconds)  # fmt: skip
        for index, step in enumerate(steps):
            print(f"[{profile} {index + 1}/{len(steps)}] {step.name} ...", flush=True)
            log = arguments.work / "logs" / f"{profile}_{index:02d}.log"
            results.append(run_step(step, log, arguments.progress_seconds))
            print(f"    {results[-1]['seconds']:.1f} s, peak RSS {results[-1]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
            output.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
