"""Does a calibration survive a busy machine? Each method's cost ratio to the reference, with and without one extra
CPU-bound process (``python3 -c "while True: pass"``) beside the calibration.

Every calibration runs in its own process, by kdrepro's own measuring code (``kdrepro.train.calibrate._measure``;
random-init teacher, random in-memory batches of the profile's shape: the cost does not depend on the weights or
pixels), under one or more settings:

* ``before``: the wall clock, OpenMP's default waiting (threads spin at barriers), the profile's threads;
* ``after``: kdrepro's default on CPUs, the process's CPU time with ``OMP_WAIT_POLICY=PASSIVE``, the profile's threads;
* ``one-thread``: as ``after`` on one compute thread.

The runs are interleaved (for each repeat: every setting without, then with the extra process, the order flipped
every other repeat) so that drift and other users' load hit all alike. The precision and layout are decided once,
first (the ``hardware`` stage's rule), and fixed for every calibration. Each calibration's every timed iteration is
kept, so that several estimators of a method's cost are compared on the same runs: ``median`` (what kdrepro uses),
``p25`` (the lower quartile), ``min``, and ``paired``: the median over rounds of the method's mean iteration over the
reference method's in the same round (the rounds run the methods back to back, so load that changes between rounds
cancels). Printed per setting and estimator: each method's ratio to the
reference method without and with the extra process (median over repeats), the change per repeat pair (median, and
the sign test's 95 % interval from 6 repeats on), and the largest change (the goal is within 10 %). On a machine
others also use, "without" is not idle: the load average and the runnable processes seen while it ran are printed.

    python benchmarks/calibration_load.py                               # synthetic profile: none, kd, fitnet
    python benchmarks/calibration_load.py --repeats 6 --settings after,one-thread profile=smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from interleaved import median_interval

#: setting -> (calibrate.clock, OMP_WAIT_POLICY or None for OpenMP's default, threads or None for the profile's)
SETTINGS: dict[str, tuple[str, str | None, int | None]] = {
    "before": ("wall", None, None), "after": ("cpu", "PASSIVE", None), "one-thread": ("cpu", "PASSIVE", 1),
}
ESTIMATORS = ("median", "p25", "min", "paired")
HOG = "while True: pass"
KEEP = ("seconds_per_iteration", "wall_seconds_per_iteration", "cpu_seconds_per_iteration", "relative_spread",
        "flops_per_iteration")


def child(overrides: list[str], decide_only: bool) -> None:
    """One calibration in this process; prints ``{method: entry + timed iterations}`` as JSON on the last line (or,
    with ``decide_only``, the precision / layout decision)."""
    import torch

    from kdrepro.config import load_config
    from kdrepro.distributed import DistributedContext
    from kdrepro.models import build_segmentor
    from kdrepro.train import calibrate as calibration
    from kdrepro.train.hardware import apply_speed

    base = apply_speed(load_config(overrides))  # the hardware stage's rule (decided once by the parent)
    if decide_only:
        print(json.dumps({"precision": str(base.precision), "channels_last": bool(base.channels_last)}))
        return
    torch.set_num_threads(int(base.threads or torch.get_num_threads()))
    height, width = (int(v) for v in base.dataset.crop_size)
    batch, classes = int(base.loader.batch_size), int(base.dataset.num_classes)

    def batches(*_args, **_kwargs):
        while True:
            yield torch.randn(batch, 3, height, width), torch.randint(0, classes, (batch, height, width))

    def teacher(cfg, num_classes, device):
        return build_segmentor(cfg.teacher, num_classes).to(device).eval().requires_grad_(False)

    histories: list[list[dict[str, float]]] = []
    reduce = calibration.slowest_rank_history

    def kept(history, context, device):  # every timed iteration, in the order _measure reduces them (= methods)
        histories.append(reduce(history, context, device))
        return histories[-1]

    calibration.load_teacher, calibration.build_dataset, calibration.training_loader = teacher, lambda *a, **k: None, batches
    calibration.slowest_rank_history = kept
    configs = {name: apply_speed(load_config([*overrides, f"method={name}"])) for name in base.calibrate.methods}
    methods = calibration._measure(base, configs, torch.device("cpu"), DistributedContext())
    key = calibration.clock_key(base.calibrate, torch.device("cpu"))
    out = {name: {**{k: entry[k] for k in KEEP}, "timed": [record[key] for record in history]}
           for (name, entry), history in zip(methods.items(), histories, strict=True)}
    print(json.dumps({"threads": torch.get_num_threads(), "iterations_per_round": int(base.calibrate.iterations_per_round),
                      "methods": out}))


class LoadWatch:
    """Samples the machine's runnable processes (``/proc/loadavg``'s 4th field, minus this benchmark's own) every
    second while it runs: what "without the extra process" meant."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
            except (OSError, ValueError, IndexError):
                return

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def calibrate_once(setting: str, busy: bool, overrides: list[str]) -> dict:
    clock, policy, threads = SETTINGS[setting]
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    extra = [f"calibrate.clock={clock}", *([f"threads={threads}"] if threads else [])]
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if busy else None
    try:
        return _run_child([*overrides, *extra], env)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def _run_child(overrides: list[str], env: dict[str, str] | None = None, decide_only: bool = False) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *(["--decide-only"] if decide_only else []), *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"calibration child failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate(timed: list[float], estimator: str) -> float:
    """A method's cost from its timed iterations: ``median``, ``p25`` (lower quartile) or ``min``."""
    ordered = sorted(timed)
    if estimator == "median":
        return statistics.median(ordered)
    if estimator == "p25":
        return ordered[min(int(0.25 * (len(ordered) - 1) + 0.5), len(ordered) - 1)]
    return ordered[0]


def ratios(run: dict, reference: str, estimator: str) -> dict[str, float]:
    """Each method's cost over the reference method's in one calibration, by ``estimator``."""
    methods = run["methods"]
    if estimator == "paired":
        per_round = int(run["iterations_per_round"])

        def rounds(timed: list[float]) -> list[float]:
            return [statistics.fmean(timed[i:i + per_round]) for i in range(0, len(timed), per_round)]

        anchor = rounds(methods[reference]["timed"])
        return {name: statistics.median(a / b for a, b in zip(rounds(entry["timed"]), anchor, strict=True))
                for name, entry in methods.items()}
    anchor_cost = estimate(methods[reference]["timed"], estimator)
    return {name: estimate(entry["timed"], estimator) / anchor_cost for name, entry in methods.items()}


def changes(runs: dict[tuple[str, bool], list[dict]], setting: str, name: str, reference: str, estimator: str) -> dict:
    """Ratios to the reference without / with the extra process (median over repeats) and the change per repeat
    pair (busy / idle - 1) with the sign test's 95 % interval (None below 6 pairs)."""
    idle = [ratios(run, reference, estimator)[name] for run in runs[setting, False]]
    busy = [ratios(run, reference, estimator)[name] for run in runs[setting, True]]
    pairs = [b / i - 1 for i, b in zip(idle, busy, strict=True)]
    interval = median_interval(pairs) if len(pairs) >= 6 else None
    return {"idle": statistics.median(idle), "busy": statistics.median(busy),
            "change": statistics.median(busy) / statistics.median(idle) - 1, "pairs": pairs,
            "interval": None if interval is None else [interval.low, interval.high]}


def report(runs: dict, chosen: list[str], methods: list[str], reference: str, repeats: int) -> dict:
    """Prints and returns the table of changes per setting, estimator and method."""
    table: dict = {}
    print(f"\nratio to {reference} (median of {repeats}): without / with one extra CPU-bound process; change per pair "
          "(median [95 % interval])")
    for setting in chosen:
        clock, policy, threads = SETTINGS[setting]
        print(f"{setting} (clock {clock}, OMP_WAIT_POLICY {policy or 'default'}, threads {threads or 'profile'}):")
        for estimator in ESTIMATORS:
            worst, rows = 0.0, {}
            for name in (m for m in methods if m != reference):
                row = rows[name] = changes(runs, setting, name, reference, estimator)
                worst = max(worst, abs(row["change"]))
                span = f"[{100 * row['interval'][0]:+.1f}, {100 * row['interval'][1]:+.1f}]" if row["interval"] else ""
                print(f"  {estimator:<6} {name:<8} {row['idle']:6.3f} {row['busy']:6.3f}  {100 * row['change']:+6.1f} % {span}")
            print(f"  {estimator:<6} largest change {100 * worst:.1f} % (goal: within 10 %)")
            table.setdefault(setting, {})[estimator] = {"rows": rows, "largest_change": worst}
        spreads = {busy: statistics.median(e["relative_spread"] for r in runs[setting, busy] for e in r["methods"].values())
                   for busy in (False, True)}
        print(f"  median IQR / median of a method's iterations: {100 * spreads[False]:.0f} % without, "
              f"{100 * spreads[True]:.0f} % with the extra process")
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="calibrations per setting and load (interleaved)")
    parser.add_argument("--methods", default="none,kd,fitnet")
    parser.add_argument("--reference", default="kd")
    parser.add_argument("--settings", default="before,after", help=f"which of {','.join(SETTINGS)} to run")
    parser.add_argument("--json", type=Path, help="also write every calibration and the table here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decide-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the synthetic profile's calibration)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.overrides, args.decide_only)
        return {}
    chosen = args.settings.split(",")
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}: use any of {', '.join(SETTINGS)}")
    # random-init backbones: runs on a fresh clone, without the pipeline's pre-trained ones (same cost)
    overrides = ["student.pretrained=null", "teacher.pretrained=null", f"calibrate.methods=[{args.methods}]", *args.overrides]
    decision = _run_child(overrides, decide_only=True)  # once: every calibration at the same precision and layout
    overrides += [f"precision={decision['precision']}", f"channels_last={str(decision['channels_last']).lower()}"]
    print(f"speed settings decided once: {decision}; load average before: {Path('/proc/loadavg').read_text().strip()}")
    runs: dict[tuple[str, bool], list[dict]] = {(s, b): [] for s in chosen for b in (False, True)}
    with LoadWatch() as watch:
        for repeat in range(args.repeats):
            for setting in chosen:
                for busy in (False, True) if repeat % 2 == 0 else (True, False):
                    start = time.perf_counter()
                    run = calibrate_once(setting, busy, overrides)
                    runs[setting, busy].append(run)
                    speed = ", ".join(f"{n} {1000 * e['seconds_per_iteration']:.0f} ms" for n, e in run["methods"].items())
                    print(f"repeat {repeat + 1} {setting:<10} {'with' if busy else 'without':<7} extra process "
                          f"({time.perf_counter() - start:.0f} s): {speed}", flush=True)
    load = statistics.median(watch.samples) if watch.samples else float("nan")
    print(f"runnable processes on the machine while it ran (median of {len(watch.samples)} samples, this benchmark's "
          f"own included): {load:g}; load average after: {Path('/proc/loadavg').read_text().strip()}")
    table = report(runs, chosen, args.methods.split(","), args.reference, args.repeats)
    result = {"decision": decision, "overrides": overrides, "runnable_median": load, "table": table,
              "runs": {f"{s}/{'with' if b else 'without'}": v for (s, b), v in runs.items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
