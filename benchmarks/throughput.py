"""Training throughput: a reference-codebase-style loop vs kdrepro's loop, per method, with a 95 % interval.

The **reference** loop is set explicitly, whatever the profile: fp32, NCHW, eager, teacher under ``no_grad``,
per-parameter SGD (``foreach=False``), ``cudnn.benchmark`` off. **kdrepro**'s loop is what a pipeline on this machine
trains with: the speed settings the hardware stage picks here (``precision``, ``channels_last``: by capability and
measurement, see ``kdrepro/train/hardware.py``), teacher under ``inference_mode``, foreach / fused SGD,
``cudnn.benchmark``. ``--precision`` / ``--channels-last`` fix them instead, and ``--candidates`` times every
candidate setting against the reference (what the choice is made from).

Both loops train the same student / teacher architectures (random-init: the cost does not depend on the weights) on
the same in-memory batch of the profile's shape and classes, interleaved step by step (reference, kdrepro,
reference, ...), so drift and other load hit both alike. Reported per method: each loop's median seconds per
iteration, the median of the pairs' speed-ups (reference time / kdrepro time) with the sign test's 95 % interval
(``benchmarks/interleaved.py``), FLOPs per iteration and, on known GPUs, model FLOP utilisation. CPU runs time the
process's CPU time by default (``--clock wall`` for wall time), which other users' load barely changes.

    python benchmarks/throughput.py                          # the synthetic profile's sizes; runs on a fresh clone
    python benchmarks/throughput.py --candidates             # every candidate precision / layout vs the reference
    python benchmarks/throughput.py --paper                  # paper size: width 64, 512x1024, batch 8 (GPU)
    python benchmarks/throughput.py --methods kd,cwd --rounds 20 profile=smoke
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/throughput.py   # an AVX2-only CPU, emulated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from interleaved import median_interval, paired
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrepro.config import load_config
from kdrepro.distributed import resolve_device
from kdrepro.models import build_segmentor
from kdrepro.train.calibrate import AtenFlopCounter
from kdrepro.train.timing import synchronize
from kdrepro.train.trainer import Trainer

#: dense bf16 tensor-core peaks (FLOP/s) by device-name fragment
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "4090": 165.2e12}
#: the reference loop's settings, fixed whatever the profile says
REFERENCE = {"precision": "fp32", "channels_last": False, "compile": False}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def base_config(overrides: Sequence[str], paper: bool) -> DictConfig:
    """The profile's config with random-init backbones (no finished pipeline needed)."""
    sizes = ["profile=cityscapes", "loader.batch_size=8", "memory_bank_scale=1.0"] if paper else ["memory_bank_scale=0.05"]
    return load_config([*sizes, "student.pretrained=null", "teacher.pretrained=null", *overrides])


def with_settings(cfg: DictConfig, **values: Any) -> DictConfig:
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(copy):
        for key, value in values.items():
            copy[key] = value
    return copy


def kdrepro_settings(cfg: DictConfig, precision: str | None, channels_last: str | None) -> tuple[dict[str, Any], str]:
    """kdrepro's speed settings on this machine and where they come from: the hardware stage's decision for
    ``auto`` (the default here), or the fixed values given."""
    wanted = with_settings(cfg, precision=precision or "auto", channels_last=_flag(channels_last or "auto"))
    fixed = {"precision": str(wanted.precision), "channels_last": wanted.channels_last, "compile": bool(cfg.compile)}
    if "auto" not in (fixed["precision"], fixed["channels_last"]):
        return fixed, "fixed on the command line"
    try:
        from kdrepro.train.hardware import apply_speed
    except ImportError:  # a kdrepro without the hardware stage: the profile's own settings
        return {**fixed, "precision": str(cfg.precision), "channels_last": bool(cfg.channels_last)}, "the profile's settings"
    chosen = apply_speed(wanted)
    settings = {**fixed, "precision": str(chosen.precision), "channels_last": bool(chosen.channels_last)}
    return settings, "decided on this machine by kdrepro's hardware stage"


def _flag(value: str) -> Any:
    return value if value == "auto" else value.lower() in ("1", "true", "yes")


def build(cfg: DictConfig, method: str, settings: dict[str, Any], device: torch.device, teacher: torch.nn.Module,
          reference: bool) -> Trainer:
    """A trainer for ``method`` with ``settings``; the reference one gets the reference codebases' habits."""
    trainer = Trainer(with_settings(load_config_for(cfg, method), **settings), device, teacher=teacher)
    if reference:
        trainer.teacher_grad_context = torch.no_grad
        trainer.optimizer = torch.optim.SGD(trainer.optimizer.param_groups, lr=0.01, momentum=0.9, foreach=False)
    return trainer


def load_config_for(cfg: DictConfig, method: str) -> DictConfig:
    return with_settings(cfg, method=OmegaConf.to_container(load_config([f"method={method}"]).method, resolve=True))


def step_timer(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, benchmark_cudnn: bool,
               clock: Callable[[], float], threads: int) -> Callable[[], float]:
    """A closure running one training step on ``threads`` compute threads and returning its duration on ``clock``."""
    images = images.contiguous(memory_format=trainer.memory_format)

    def run() -> float:
        torch.backends.cudnn.benchmark = benchmark_cudnn
        torch.set_num_threads(threads)
        synchronize(trainer.device)
        start = clock()
        trainer.step(images, labels, progress=0.0)
        synchronize(trainer.device)
        return clock() - start

    return run


def flops(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> int:
    counter = AtenFlopCounter()
    context = trainer.teacher_grad_context
    trainer.teacher_grad_context = torch.no_grad  # inference mode bypasses the counter
    try:
        with counter:
            trainer.step(images, labels, progress=0.0)
    finally:
        trainer.teacher_grad_context = context
    return counter.total


def compare(reference: Callable[[], float], candidate: Callable[[], float], rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved steps of both loops: medians and the pairs' speed-up with its interval."""
    for _ in range(warmup):
        reference(), candidate()
    ref_times, opt_times = [], []
    for _ in range(rounds):
        ref_times.append(reference())
        opt_times.append(candidate())
    speedup = median_interval(paired(ref_times, opt_times, "ratio")) if rounds >= 6 else None
    return {"reference_seconds": statistics.median(ref_times), "kdrepro_seconds": statistics.median(opt_times),
            "speedup": statistics.median(paired(ref_times, opt_times, "ratio")),
            "speedup_interval": None if speedup is None else [speedup.low, speedup.high], "rounds": rounds}


def candidate_settings(cfg: DictConfig, device: torch.device) -> list[dict[str, Any]]:
    """Every precision / layout worth timing here: bf16 only where this device runs it natively."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    precisions = ["fp32", "bf16"] if native else ["fp32"]
    return [{"precision": p, "channels_last": c, "compile": bool(cfg.compile)} for p in precisions for c in (False, True)]


def label(settings: dict[str, Any]) -> str:
    layout = "channels_last" if settings["channels_last"] else "NCHW"
    return f"{settings['precision']}/{layout}" + ("/compiled" if settings.get("compile") else "")


def main(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="paper sizes: width 64, 512x1024, batch 8")
    parser.add_argument("--methods", default="kd,fitnet,cwd,cirkd", help="comma-separated method configs")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved pairs per method (6 or more for an interval)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None, help="default: cpu on CPUs, wall on GPUs")
    parser.add_argument("--precision", default=None, help="kdrepro's precision (default: auto, the hardware stage's choice)")
    parser.add_argument("--channels-last", default=None, help="kdrepro's layout: true / false (default: auto)")
    parser.add_argument("--candidates", action="store_true", help="time every candidate setting, not only kdrepro's")
    parser.add_argument("--threads", type=int, default=None,
                        help="kdrepro's compute threads per process (default: the profile's, as the reference); with "
                             "the CPU clock, 1 measures images per core-second of one-thread processes, one per core")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=smoke")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cfg = base_config(args.overrides, args.paper)
    if device.type == "cpu" and cfg.get("threads") not in (None, "auto"):
        torch.set_num_threads(int(cfg.threads))
    reference_threads = torch.get_num_threads()
    threads = args.threads or reference_threads
    clock = {"cpu": time.process_time, "wall": time.perf_counter}[args.clock or ("wall" if device.type == "cuda" else "cpu")]
    height, width = (int(v) for v in cfg.dataset.crop_size)
    batch, classes = int(cfg.loader.batch_size), int(cfg.dataset.num_classes)
    images = torch.randn(batch, 3, height, width, device=device)
    labels = torch.randint(0, classes, (batch, height, width), device=device)
    teacher = build_segmentor(cfg.teacher, classes).to(device).eval().requires_grad_(False)
    chosen, source = kdrepro_settings(cfg, args.precision, args.channels_last)
    loops = candidate_settings(cfg, device) if args.candidates else [chosen]
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'default')}")
    print(f"device: {name}; {cfg.profile_name} profile: student {cfg.student.name} w{cfg.student.base_width}, teacher "
          f"{cfg.teacher.name} w{cfg.teacher.base_width}, {classes} classes; batch {batch}, crop {height}x{width}; "
          f"clock {'CPU time' if clock is time.process_time else 'wall'}; {args.rounds} interleaved pairs per row")
    print(f"reference: {label(REFERENCE)}, no_grad teacher, per-parameter SGD, {reference_threads} threads; kdrepro: "
          f"{label(chosen)} ({source}), {threads} thread(s) per process")
    print(f"{'method':<8} {'kdrepro loop':<26} {'ref s/it':>9} {'s/it':>8} {'speed-up':>9} {'95 % interval':>15} "
          f"{'GFLOP/it':>9} {'MFU':>6}")
    results: dict[str, Any] = {"device": name, "reference": REFERENCE, "kdrepro": chosen, "source": source,
                               "reference_threads": reference_threads, "threads": threads, "rows": []}
    for method in args.methods.split(","):
        reference = build(cfg, method, REFERENCE, device, teacher, reference=True)
        work = flops(reference, images, labels)
        ref_step = step_timer(reference, images, labels, False, clock, reference_threads)
        for settings in loops:
            optimised = build(cfg, method, settings, device, teacher, reference=False)
            row = {"method": method, "loop": label(settings), **settings, "chosen": settings == chosen,
                   **compare(ref_step, step_timer(optimised, images, labels, True, clock, threads), args.rounds, args.warmup)}
            row["flops_per_iteration"] = work
            results["rows"].append(row)
            interval = row["speedup_interval"]
            span = f"{interval[0]:.2f}-{interval[1]:.2f}x" if interval else "n/a"
            mfu = f"{100 * work / row['kdrepro_seconds'] / peak:5.1f}%" if peak else "   n/a"
            mark = " *" if row["chosen"] and args.candidates else ""
            print(f"{method:<8} {label(settings) + mark:<26} {row['reference_seconds']:9.4f} {row['kdrepro_seconds']:8.4f} "
                  f"{row['speedup']:8.2f}x {span:>15} {work / 1e9:9.2f} {mfu}", flush=True)
            del optimised
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.candidates:
        print("* kdrepro's choice on this machine")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
