"""How long the pipeline takes on G GPUs when its runs are jobs (``kdrepro plan``'s cluster table).

The once-per-pipeline stages (pre-training, teacher, calibration) are counted one after another; then the per-seed
runs of both protocols, then the extended runs (the best segmentation-specific method is chosen from the compute-matched
results). Within a phase the runs are independent: each takes ``world_size`` GPUs (the calibration's number of
processes, which every compute-matched run must match), so ``G // world_size`` run at once, packed longest first
(LPT list scheduling: within 4/3 of the best packing). Queueing, start-up, evaluation and checkpoints are not
included, and neither the calibration and student-alone runs beside the teacher's training (the calibration times
the teacher's architecture, not its weights) nor iteration-matched runs overlapping the calibration are counted: a
conservative estimate.
"""

from __future__ import annotations

import heapq
from typing import Any


def makespan(durations: list[float], slots: int) -> float:
    """The finish time of ``durations`` on ``slots`` parallel slots, longest first to the least-loaded slot."""
    loads = [0.0] * max(1, min(slots, len(durations)))
    for duration in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads, default=0.0)


def wall_clock(rows: list[dict[str, Any]], seeds: int, gpus: int, world_size: int) -> dict[str, Any]:
    """Wall-clock seconds of the plan's ``rows`` on ``gpus`` GPUs (None when fewer GPUs than one run needs)."""
    slots = gpus // world_size
    if slots < 1:
        return {"gpus": gpus, "parallel_runs": 0, "seconds": None}
    once = sum(row["seconds"] for row in rows if row["per"] == "pipeline")
    core = [row["seconds"] for row in rows if row["per"] == "seed" and not row["stage"].startswith("extended")] * seeds
    extended = [row["seconds"] for row in rows if row["stage"].startswith("extended")] * seeds
    seconds = once + makespan(core, slots) + makespan(extended, slots)
    return {"gpus": gpus, "parallel_runs": slots, "seconds": seconds}
