"""Calibration under ``torchrun``: every rank times the same interleaved rounds in lockstep; these helpers agree
on what to measure (rank 0's previous table), reduce each iteration's timings to the slowest rank, and record the
memory facts the cost planner compares against (the device's memory, the process's peak resident memory).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
import torch.distributed as dist

from kdrepro.distributed import DistributedContext


def from_rank_zero(value: Any, context: DistributedContext) -> Any:
    """Rank 0's copy of a picklable value on every rank (no-op in one process)."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def reduce_over_ranks(value: float, context: DistributedContext, device: torch.device, op: str) -> float:
    """``max`` or ``sum`` of a number over ranks (the number itself in one process)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(tensor.item())


def slowest_rank_history(history: list[dict[str, float]], context: DistributedContext, device: torch.device) -> list[dict[str, float]]:
    """Each timed iteration's record with every phase and the total replaced by its maximum over ranks (the ranks
    ran the same iterations in lockstep, so record ``i`` is the same iteration everywhere)."""
    if not context.enabled or not history:
        return history
    keys = list(history[0])
    values = torch.tensor([[record[key] for key in keys] for record in history], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [dict(zip(keys, row, strict=True)) for row in values.tolist()]


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the GPU, or physical RAM of this machine for a CPU calibration (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (every method and the shared teacher together; CPU runs have no
    per-method peak, unlike ``torch.cuda.max_memory_allocated``)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def resident_bytes(trainer: Any) -> int:
    """Bytes a training run of this trainer's method keeps between iterations: the student's and the method's
    parameters, buffers (e.g. CIRKD's queues), gradients and optimizer state, and the teacher it reads.

    Calibration holds every method at once, so the allocator's peak during a method's block counts the others'
    models too; ``peak during the block − memory resident before it + this`` is the method's peak on its own.
    """
    modules = [trainer.student, trainer.distiller, *([trainer.teacher] if trainer.teacher is not None else [])]
    tensors = {id(t): t for module in modules for t in (*module.parameters(), *module.buffers())}
    tensors.update({id(v): v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)})
    gradients = sum(p.numel() * p.element_size() for p in trainer.student.parameters() if p.requires_grad)
    return sum(t.numel() * t.element_size() for t in tensors.values()) + gradients
