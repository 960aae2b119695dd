"""Does a calibration survive a busy machine? Each method's cost ratio to the reference, with and without one extra
CPU-bound process (``python3 -c "while True: pass"``) beside the calibration.

Every calibration runs in its own process, by kdrepro's own measuring code (``kdrepro.train.calibrate._measure``;
random-init teacher, random in-memory batches of the profile's shape: the cost does not depend on the weights or
pixels), under two settings:

* ``before``: the wall clock, OpenMP's default waiting (threads spin at barriers);
* ``after``: kdrepro's default on CPUs, the process's CPU time with ``OMP_WAIT_POLICY=PASSIVE``.

The runs are interleaved (for each repeat: every setting without, then with the extra process, the order flipped
every other repeat) so that drift and other users' load hit all alike. Printed per setting: each method's median
ratio to the reference method without and with the extra process, the change, and the largest change (the goal is
within 10 %). On a machine others also use, "without" is not idle: it is "without the extra process".

    python benchmarks/calibration_load.py                               # synthetic profile: none, kd, fitnet
    python benchmarks/calibration_load.py --repeats 3 --methods none,kd,fitnet,cwd,cirkd
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

#: setting -> (calibrate.clock, OMP_WAIT_POLICY or None for OpenMP's default)
SETTINGS = {"before": ("wall", None), "after": ("cpu", "PASSIVE")}
HOG = "while True: pass"


def child(overrides: list[str]) -> None:
    """One calibration in this process; prints {method: entry} as JSON on the last line."""
    import torch

    from kdrepro.config import load_config
    from kdrepro.distributed import DistributedContext
    from kdrepro.models import build_segmentor
    from kdrepro.train import calibrate as calibration
    from kdrepro.train.hardware import apply_speed

    # `auto` speed settings decided as `kdrepro calibrate` decides them (once per process: every method the same)
    base = apply_speed(load_config(overrides))
    torch.set_num_threads(int(base.threads or torch.get_num_threads()))
    height, width = (int(v) for v in base.dataset.crop_size)
    batch, classes = int(base.loader.batch_size), int(base.dataset.num_classes)

    def batches(*_args, **_kwargs):
        while True:
            yield torch.randn(batch, 3, height, width), torch.randint(0, classes, (batch, height, width))

    def teacher(cfg, num_classes, device):
        return build_segmentor(cfg.teacher, num_classes).to(device).eval().requires_grad_(False)

    calibration.load_teacher, calibration.build_dataset, calibration.training_loader = teacher, lambda *a, **k: None, batches
    configs = {name: apply_speed(load_config([*overrides, f"method={name}"])) for name in base.calibrate.methods}
    methods = calibration._measure(base, configs, torch.device("cpu"), DistributedContext())
    keep = ("seconds_per_iteration", "wall_seconds_per_iteration", "cpu_seconds_per_iteration", "relative_spread", "flops_per_iteration")
    print(json.dumps({name: {key: entry[key] for key in keep} for name, entry in methods.items()}))


def calibrate_once(setting: str, busy: bool, overrides: list[str]) -> dict[str, dict[str, float]]:
    clock, policy = SETTINGS[setting]
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if busy else None
    try:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", *overrides, f"calibrate.clock={clock}"]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.strip().splitlines()[-1])


def ratios(table: dict[str, dict[str, float]], reference: str) -> dict[str, float]:
    return {name: entry["seconds_per_iteration"] / table[reference]["seconds_per_iteration"] for name, entry in table.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="calibrations per setting and load (interleaved)")
    parser.add_argument("--methods", default="none,kd,fitnet")
    parser.add_argument("--reference", default="kd")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="which of before,after to run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the synthetic profile's calibration)")
    args = parser.parse_args()
    if args.child:
        return child(args.overrides)
    # random-init backbones: runs on a fresh clone, without the pipeline's pre-trained ones (same cost)
    overrides = ["student.pretrained=null", "teacher.pretrained=null", f"calibrate.methods=[{args.methods}]", *args.overrides]
    chosen = args.settings.split(",")
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {(s, b): [] for s in chosen for b in (False, True)}
    for repeat in range(args.repeats):
        for setting in chosen:
            for busy in (False, True) if repeat % 2 == 0 else (True, False):
                table = calibrate_once(setting, busy, overrides)
                runs[setting, busy].append(ratios(table, args.reference))
                speed = ", ".join(f"{n} {1000 * e['seconds_per_iteration']:.0f} ms" for n, e in table.items())
                print(f"repeat {repeat + 1} {setting:<6} {'with' if busy else 'without':<7} extra process: {speed}", flush=True)
    print(f"\nratio to {args.reference} (median of {args.repeats}): without / with one extra CPU-bound process")
    for setting in chosen:
        clock, policy = SETTINGS[setting]
        print(f"{setting} (clock {clock}, OMP_WAIT_POLICY {policy or 'default'}):")
        worst = 0.0
        for name in args.methods.split(","):
            if name == args.reference:
                continue
            idle = statistics.median(r[name] for r in runs[setting, False])
            busy = statistics.median(r[name] for r in runs[setting, True])
            worst = max(worst, abs(busy / idle - 1))
            print(f"  {name:<8} {idle:6.3f} {busy:6.3f}  {100 * (busy / idle - 1):+6.1f} %")
        print(f"  largest change {100 * worst:.1f} % (goal: within 10 %)")


if __name__ == "__main__":
    main()
