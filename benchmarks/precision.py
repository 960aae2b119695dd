"""Is ``precision: auto`` / ``channels_last: auto`` as fast as the best fixed choice on this CPU? ``python benchmarks/precision.py``

Runs the decision of the ``hardware`` stage (:mod:`kdrepro.train.hardware`: capability, then one-thread CPU-time
measurement; one choice per role), then times every fixed choice (fp32 / bf16 × NCHW / channels_last; ``--fixed``
narrows them) at the step level, on the profile's student training step, its teacher's training step and a logit-KD
step (random batches of the profile's shape), interleaved round by round (order rotated), on one thread by default
(``--threads``: on a machine shared with other work, two threads spin-wait for each other and a step's CPU time
grows tenfold; measured here under load). Each step's wall time and process CPU time are recorded. Printed: the
median step per choice and, per row, the automatic choice's time over the best fixed choice's (median over rounds of
the paired per-round ratio, with a bootstrap 95 % interval), in both clocks. The rows are what the pipeline runs:

* ``student pretrain``: the student's step at the ``student`` role's choice (the student backbone's pre-training);
* ``teacher``: the teacher's step at the ``teacher`` role's choice (the teacher and its backbone's pre-training);
* ``kd (methods)``: the logit-KD step at the ``methods`` role's choice (every method's runs);
* ``student (methods)``: the student's step at the ``methods`` role's choice (the student-alone runs);
* ``sum``: the first three rows' steps added, each at its role's choice, against the best single fixed choice.

A ratio up to 1.05 meets the goal "never slower than the best fixed choice within 5 %".

``--isa avx2`` emulates a CPU without native bf16: ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN) and
``ATEN_CPU_CAPABILITY=avx2`` (ATen) make a newer CPU run the AVX2 kernels (set before torch is imported).
``--tiny`` shrinks models and batch (CI: ``tests/benchmarks/test_precision.py``). Wall-clock numbers on a shared
machine are noisy; the CPU-time ratios are the steadier ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
LABELS = ("fp32/nchw", "fp32/channels_last", "bf16/nchw", "bf16/channels_last")
#: printed row -> (workload timed, role whose choice it runs at)
ROWS = {"student pretrain": ("student", "student"), "teacher": ("teacher", "teacher"), "kd (methods)": ("kd", "methods"),
        "student (methods)": ("student", "methods")}
TINY = ["student.base_width=8", "teacher.base_width=8", "loader.batch_size=2", "dataset.crop_size=[32,64]"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="synthetic")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), help="emulate an older CPU (before torch is imported)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per choice and workload")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time of one thread is what other load moves least)")
    parser.add_argument("--tiny", action="store_true", help="width-8 models, batch 2, 32x64 crops (CI)")
    parser.add_argument("--fixed", default=",".join(LABELS),
                        help="the fixed choices to time (default all four; e.g. fp32/nchw,fp32/channels_last where bf16 is "
                             "emulated and can never be the best)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the profile")
    return parser.parse_args(argv)


def ratio_interval(auto: list[float], best: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median of the paired per-round ratios auto/best and its bootstrap 95 % interval."""
    ratios = [a / b for a, b in zip(auto, best, strict=True)]
    generator = random.Random(0)
    medians = sorted(statistics.median(generator.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def timed(step) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(args: argparse.Namespace) -> dict:
    import torch

    from kdrepro.config import load_config
    from kdrepro.train import hardware

    cfg = load_config([f"profile={args.profile}", "precision=auto", "channels_last=auto", "speed.warmup=1",
                       *(TINY if args.tiny else []), *args.overrides])  # fmt: skip
    threads = int(args.threads)
    torch.set_num_threads(threads)
    start, start_cpu = time.perf_counter(), time.process_time()
    decision, decided_on = hardware.decide(cfg, "cpu")
    decide_seconds, decide_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    auto = {role: hardware._label(hardware.role_of(decision, role)) for role in hardware.ROLES}
    wanted = args.fixed.split(",")
    unknown = sorted(set(wanted) - set(LABELS))
    if unknown:
        raise SystemExit(f"--fixed {','.join(unknown)}: not a choice; use any of {','.join(LABELS)}")
    fixed = [c for c in hardware.PREFERENCE if hardware._label(c) in {*wanted, *auto.values()}]
    steps = {(c, w): step for c in fixed for w, step in hardware.workload_steps(cfg, "cpu", *c).items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    keys = list(steps)
    times: dict[str, dict[str, dict[str, list[float]]]] = {"wall": {}, "cpu": {}}
    for index in range(args.rounds):
        for key in keys[index % len(keys):] + keys[: index % len(keys)]:
            wall, cpu = timed(steps[key])
            for clock, value in (("wall", wall), ("cpu", cpu)):
                times[clock].setdefault(hardware._label(key[0]), {}).setdefault(key[1], []).append(value)
    return {
        "isa": args.isa or "native", "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": hardware.bf16_native("cpu"), "threads": threads, "rounds": args.rounds,
        "profile": args.profile, "tiny": args.tiny, "decision": decision, "auto": auto,
        "decide_seconds": decide_seconds, "decide_cpu_seconds": decide_cpu_seconds, "decided_on": decided_on.get("median_seconds", {}), "seconds": times,
    }


def summary(result: dict) -> dict[str, dict[str, dict]]:
    """Per clock and row (:data:`ROWS`, and their ``sum``): median per choice, the best fixed choice, auto / best
    with its interval."""
    out: dict[str, dict[str, dict]] = {}
    auto = result["auto"]
    for clock, by_choice in result["seconds"].items():
        rows = {row: ({c: v[workload] for c, v in by_choice.items()}, auto[role]) for row, (workload, role) in ROWS.items()}
        pipeline = ("student pretrain", "teacher", "kd (methods)")
        sums = {c: [sum(t) for t in zip(*(v[ROWS[r][0]] for r in pipeline), strict=True)] for c, v in by_choice.items()}
        sums["auto"] = [sum(t) for t in zip(*(rows[r][0][rows[r][1]] for r in pipeline), strict=True)]
        rows["sum"] = (sums, "auto")
        out[clock] = {}
        for row, (per_choice, chosen) in rows.items():
            medians = {c: statistics.median(v) for c, v in per_choice.items()}
            fixed = {c: m for c, m in medians.items() if c != "auto"}
            best = min(fixed, key=fixed.get)
            out[clock][row] = {"median_ms": {c: 1000 * m for c, m in medians.items()}, "best": best, "auto": chosen,
                               "auto_over_best": ratio_interval(per_choice[chosen], per_choice[best])}  # fmt: skip
    return out


def print_report(result: dict, table: dict) -> None:
    print(f"CPU capability {result['capability']} ({result['isa']}), native bf16: {result['bf16_native']}, "
          f"{result['threads']} threads, {result['rounds']} rounds, profile {result['profile']}"
          + (" (tiny)" if result["tiny"] else ""))  # fmt: skip
    print(f"auto decided in {result['decide_seconds']:.1f} s ({result['decide_cpu_seconds']:.1f} CPU s): "
          + "; ".join(f"{role} {label}" for role, label in result["auto"].items()))
    for role, entry in result["decision"].get("roles", {}).items():
        print(f"  {role}: {entry['reason']['precision']}; {entry['reason']['channels_last']}")
    choices = [c for c in next(iter(table["wall"].values()))["median_ms"] if c != "auto"]
    for clock, rows in table.items():
        print(f"\n{clock} time, median ms per step | " + " | ".join(choices) + " | auto | auto / best fixed [95 % interval]")
        for row, values in rows.items():
            ratio, low, high = values["auto_over_best"]
            cells = " | ".join(f"{values['median_ms'][c]:8.1f}" for c in choices)
            auto = values["median_ms"].get("auto", values["median_ms"].get(values["auto"]))
            print(f"{row:<17} | {cells} | {auto:8.1f} {values['auto']} | {ratio:.3f} [{low:.3f}, {high:.3f}] vs {values['best']}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):
        if "torch" in sys.modules:
            raise SystemExit("--isa must be set before torch is imported: run this script as its own process")
        os.environ.update(ISA_ENV[args.isa])
    result = run(args)
    table = summary(result)
    print_report(result, table)
    if args.json:
        args.json.write_text(json.dumps({**result, "summary": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
