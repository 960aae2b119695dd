"""Harness overhead of kdrepro's training loop, as a fraction of the training step it wraps, with a 95 % interval.

Measured in one process, interleaved (bare, harness, bare, harness, ...): each adjacent pair saw the same machine
state, so a pair's difference cancels drift and other load that lasts longer than one pair.

* ``bare``: the same student/teacher/KD step written as a plain loop (no timers, no finite check);
* ``harness``: :meth:`kdrepro.train.trainer.Trainer.timed_step` (phase timers, device syncs, finite-loss check);
* ``logging``: one dvclive log of every loss term, amortised over ``log_every`` iterations;
* ``checkpoint``: one atomic checkpoint write, amortised over ``checkpoint_every_seconds`` of training.

The step overhead is the median of the pairs' differences with the sign test's 95 % interval
(``benchmarks/interleaved.py``); logging and checkpointing add their own medians and intervals. The overhead is
stated only where the interval allows it: an interval holding 0 says "not distinguishable from zero, at most ...",
and one holding the goal says the run cannot tell (more ``--rounds``). Exit status 1 when the whole interval lies
above the goal. By default it times the process's CPU time, which other processes' load barely changes
(``--clock wall`` for wall time).

Usage: ``python benchmarks/overhead.py [--rounds 60] [--goal 2] [Hydra overrides]`` (default: the embedded profile,
method=kd, random-init teacher and backbones, so it runs on a fresh clone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from interleaved import Interval, median_interval, paired

from kdrepro.config import load_config
from kdrepro.io import save_checkpoint
from kdrepro.models import build_segmentor
from kdrepro.train.hardware import apply_speed
from kdrepro.train.run import RunState, checkpoint_state, log_step, open_live
from kdrepro.train.trainer import Trainer, autocast_context

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def verdict(overhead: Interval, goal: float) -> tuple[str, int]:
    """What an overhead interval (percent of the bare step) allows one to say against ``goal`` percent, and the
    exit status: 1 when the whole interval is above the goal, 0 otherwise."""
    span = f"95 % interval {overhead.low:+.2f} to {overhead.high:+.2f} %"
    if overhead.low > goal:
        return f"OVER the {goal:g} % goal: {overhead.median:.2f} % ({span})", 1
    if overhead.high <= goal:
        if not overhead.excludes(0.0):
            return f"not distinguishable from zero; at most {overhead.high:.2f} %, within the {goal:g} % goal ({span})", 0
        return f"{overhead.median:.2f} %, within the {goal:g} % goal ({span})", 0
    return f"cannot tell at this noise: the interval holds the {goal:g} % goal ({span}); rerun with more --rounds", 0


def step_functions(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, clock: Callable[[], float]):
    """(bare, harness): each runs one training step and returns its duration on ``clock``."""
    batches = iter(lambda: (images, labels), None)

    def bare() -> float:  # Trainer.step's work at the same precision and layout, without its timers and checks
        start = clock()
        trainer.set_progress(0.0)
        t_out = trainer.teacher_forward(images)
        with autocast_context(trainer.device, trainer.precision):
            s_out = trainer.model(images)
            losses = trainer.task_losses(s_out, labels)
            kd_terms = trainer.distiller(s_out.float(), t_out, labels)
        losses.update({name: value.float() for name, value in kd_terms.items()})
        total = torch.stack(list(losses.values())).sum()
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
        trainer.optimizer.step()
        return clock() - start

    def harness() -> float:
        start = clock()
        trainer.timed_step(batches, 0.0)
        return clock() - start

    return bare, harness


def interleave(first: Callable[[], float], second: Callable[[], float], rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    """``rounds`` pairs of (first, second), alternating, after ``warmup`` untimed pairs."""
    for _ in range(warmup):
        first(), second()
    a, b = [], []
    for _ in range(rounds):
        a.append(first())
        b.append(second())
    return a, b


def amortised(trainer: Trainer, cfg, images, labels, clock: Callable[[], float], samples: int) -> dict[str, list[float]]:
    """Seconds of one dvclive log and one checkpoint write, ``samples`` of each."""
    batches = iter(lambda: (images, labels), None)
    out: dict[str, list[float]] = {"log": [], "checkpoint": []}
    with tempfile.TemporaryDirectory() as folder:
        live = open_live(Path(folder) / "run", resumed=False)
        result, _ = trainer.timed_step(batches, 0.0)
        for step in range(samples):
            start = clock()
            log_step(live, result, 0.01, 1.0, step)
            out["log"].append(clock() - start)
        for _ in range(samples):
            start = clock()
            save_checkpoint(checkpoint_state(trainer, cfg, RunState(1, 1.0, True)), Path(folder) / "checkpoint.pt")
            out["checkpoint"].append(clock() - start)
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved (bare, harness) pairs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--goal", type=float, default=2.0, help="percent of the bare step")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the synthetic profile, method=kd)")
    args = parser.parse_args(argv)
    cfg = apply_speed(load_config(["method=kd", "student.pretrained=null", "teacher.pretrained=null", *args.overrides]))
    torch.set_num_threads(int(cfg.threads or torch.get_num_threads()))
    teacher = build_segmentor(cfg.teacher, int(cfg.dataset.num_classes)).eval()
    trainer = Trainer(cfg, torch.device("cpu"), teacher=teacher)
    height, width = (int(v) for v in cfg.dataset.crop_size)
    batch, clock = int(cfg.loader.batch_size), CLOCKS[args.clock]
    images = torch.randn(batch, 3, height, width).contiguous(memory_format=trainer.memory_format)
    labels = torch.randint(0, int(cfg.dataset.num_classes), (batch, height, width))

    bare_times, harness_times = interleave(*step_functions(trainer, images, labels, clock), args.rounds, args.warmup)
    bare = statistics.median(bare_times)
    percent = 100.0 / bare
    step = median_interval(paired(bare_times, harness_times)).scaled(percent)
    other = amortised(trainer, cfg, images, labels, clock, samples=max(6, min(args.rounds, 20)))
    logging = median_interval(other["log"]).scaled(percent / max(int(cfg.log_every), 1))
    checkpoint = median_interval(other["checkpoint"]).scaled(percent * bare / float(cfg.checkpoint_every_seconds))
    total = Interval(step.median + logging.median + checkpoint.median, step.low + logging.low + checkpoint.low,
                     step.high + logging.high + checkpoint.high, step.samples, step.confidence)

    print(f"config: {cfg.profile_name} profile, student {cfg.student.name} w{cfg.student.base_width}, teacher "
          f"{cfg.teacher.name} w{cfg.teacher.base_width}, batch {batch}, crop {height}x{width}, method {cfg.method.name}, "
          f"{cfg.precision}, {torch.get_num_threads()} threads; clock: {args.clock}")
    print(f"bare step                {bare * 1e3:8.2f} ms   (median of {len(bare_times)}, interleaved with the harness step)")
    print(f"harness step             {statistics.median(harness_times) * 1e3:8.2f} ms")
    rows = [("timers + syncs + checks", step), (f"dvclive log / {cfg.log_every} it", logging),
            (f"checkpoint / {cfg.checkpoint_every_seconds} s", checkpoint), ("total harness overhead", total)]
    for name, interval in rows:
        print(f"{name:<24} {interval.median:+7.2f} %   95 % interval {interval.low:+7.2f} to {interval.high:+7.2f} %")
    message, status = verdict(total, args.goal)
    print(f"overhead: {message}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
