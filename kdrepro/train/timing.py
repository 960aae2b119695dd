"""Per-phase timers for training steps: CUDA events on GPU, ``perf_counter`` on CPU.

Phases of one iteration (all inside the training clock): ``data`` (waiting for the next batch and copying it to the
device), ``teacher`` (frozen teacher forward), ``student`` (student forward + task losses), ``distill`` (the KD
method's loss terms), ``backward``, ``optimizer`` (student step + LR update) and ``method_step`` (a method's own extra
updates, e.g. SKD's discriminator). An iteration's wall time is measured end to end with a device synchronisation, so
the phase split adds up to it up to timer overhead. Each record also holds the iteration's ``cpu`` seconds: the CPU
time of the whole process (every compute thread), which other processes' load barely changes (calibration's clock on
CPUs, :mod:`kdrepro.train.calibrate`).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kdrepro.pipeline.matching import PHASES


def process_seconds() -> float:
    """CPU seconds used so far by this process, summed over all its threads (user + system)."""
    return time.process_time()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates per-phase seconds for the current iteration and keeps each iteration's record."""

    def __init__(self, device: torch.device):
        self.device = device
        self.use_events = device.type == "cuda"
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._current: dict[str, float] = defaultdict(float)
        self.history: list[dict[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            start_time = time.perf_counter()
            yield
            self._current[name] += time.perf_counter() - start_time

    def end_iteration(self, wall_seconds: float, cpu_seconds: float | None = None) -> dict[str, float]:
        """Close the iteration (the caller has synchronised the device) and return its record: every phase, the
        ``total`` wall seconds and, when given, the process's ``cpu`` seconds."""
        for name, start, end in self._events:
            self._current[name] += start.elapsed_time(end) / 1000.0
        record = {phase: self._current.get(phase, 0.0) for phase in PHASES}
        record["total"] = wall_seconds
        if cpu_seconds is not None:
            record["cpu"] = cpu_seconds
        self.history.append(record)
        self._events.clear()
        self._current = defaultdict(float)
        return record


def summarize(history: list[dict[str, float]], skip: int = 0) -> dict[str, dict[str, float]]:
    """Median and total of each phase over the recorded iterations (the first ``skip`` are warm-up)."""
    records = history[skip:] or history
    if not records:
        return {}
    keys = list(records[0])
    return {
        "median": {key: statistics.median(r[key] for r in records) for key in keys},
        "total": {key: sum(r[key] for r in records) for key in keys},
    }
