"""Harness overhead of kdrepro's training loop, as a fraction of the training step it wraps.

Measured in one process, interleaved (A B A B ...) so machine drift hits both alike, medians over rounds:

* ``bare``: the same student/teacher/KD step written as a plain loop (no timers, no finite check);
* ``harness``: :meth:`kdrepro.train.trainer.Trainer.timed_step` (phase timers, device syncs, finite-loss check);
* ``logging``: one dvclive log of every loss term, amortised over ``log_every`` iterations;
* ``checkpoint``: one atomic checkpoint write, amortised over ``checkpoint_every_seconds`` of training.

Usage: ``python benchmarks/overhead.py [Hydra overrides]`` (default: the embedded profile, method=kd, a random-init
teacher). Prints each overhead as a percentage of the bare step.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdrepro.config import load_config
from kdrepro.io import save_checkpoint
from kdrepro.models import build_segmentor
from kdrepro.train.hardware import apply_speed
from kdrepro.train.run import RunState, checkpoint_state, log_step, open_live
from kdrepro.train.trainer import Trainer


def main(overrides: list[str]) -> None:
    cfg = apply_speed(load_config(["method=kd", *overrides]))  # the profile's `auto` settings, decided here
    torch.set_num_threads(int(cfg.threads or torch.get_num_threads()))
    device = torch.device("cpu")
    teacher = build_segmentor(cfg.teacher, int(cfg.dataset.num_classes)).eval()
    trainer = Trainer(cfg, device, teacher=teacher)
    height, width = (int(v) for v in cfg.dataset.crop_size)
    batch = int(cfg.loader.batch_size)
    images = torch.randn(batch, 3, height, width)
    labels = torch.randint(0, int(cfg.dataset.num_classes), (batch, height, width))
    batches = iter(lambda: (images, labels), None)

    def bare() -> float:
        start = time.perf_counter()
        trainer.set_progress(0.0)
        with torch.inference_mode():
            t_out = trainer.teacher(images)
        from kdrepro.train.trainer import clone_output

        t_out = clone_output(t_out)
        s_out = trainer.student(images)
        losses = trainer.task_losses(s_out, labels)
        losses.update(trainer.distiller(s_out, t_out, labels))
        total = sum(losses.values())
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
        trainer.optimizer.step()
        return time.perf_counter() - start

    def harness() -> float:
        start = time.perf_counter()
        trainer.timed_step(batches, 0.0)
        return time.perf_counter() - start

    for _ in range(5):
        bare(), harness()
    bare_times, harness_times = [], []
    for _ in range(int(cfg.get("rounds", 30))):
        bare_times.append(bare())
        harness_times.append(harness())
    bare_median, harness_median = statistics.median(bare_times), statistics.median(harness_times)

    with tempfile.TemporaryDirectory() as folder:
        live = open_live(Path(folder) / "run", resumed=False)
        result, _ = trainer.timed_step(batches, 0.0)
        log_times = []
        for step in range(20):
            start = time.perf_counter()
            log_step(live, result, 0.01, 1.0, step)
            log_times.append(time.perf_counter() - start)
        save_times = []
        for _ in range(3):
            start = time.perf_counter()
            save_checkpoint(checkpoint_state(trainer, cfg, RunState(1, 1.0, True)), Path(folder) / "checkpoint.pt")
            save_times.append(time.perf_counter() - start)
    log_per_iteration = statistics.median(log_times) / max(int(cfg.log_every), 1)
    save_per_iteration = statistics.median(save_times) * bare_median / float(cfg.checkpoint_every_seconds)

    print(f"config: {cfg.profile_name} profile, student {cfg.student.name} w{cfg.student.base_width}, teacher "
          f"{cfg.teacher.name} w{cfg.teacher.base_width}, batch {batch}, crop {height}x{width}, method {cfg.method.name}")
    print(f"bare step                {bare_median * 1e3:8.2f} ms   (baseline, median of {len(bare_times)})")
    print(f"harness step             {harness_median * 1e3:8.2f} ms   ratio {harness_median / bare_median:.3f}")
    rows = [
        ("timers + syncs + checks", harness_median - bare_median),
        (f"dvclive log / {cfg.log_every} it", log_per_iteration),
        (f"checkpoint / {cfg.checkpoint_every_seconds} s", save_per_iteration),
    ]
    for name, seconds in rows:
        print(f"{name:<24} {seconds * 1e3:8.3f} ms   {100 * seconds / bare_median:6.2f} % of the bare step")
    total = sum(seconds for _, seconds in rows)
    print(f"{'total harness overhead':<24} {total * 1e3:8.3f} ms   {100 * total / bare_median:6.2f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
