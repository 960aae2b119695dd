"""Training budgets and the learning-rate schedule over training *progress*.

Three kinds (``conf/budget/``):

* ``iterations`` -- a fixed number of optimiser steps; progress = step / iterations.
* ``seconds`` -- a literal wall-clock budget; only training steps count (not evaluation, checkpointing or data-loader
  start-up); progress = train seconds / budget seconds. The clock is saved in checkpoints, so it survives resume.
* ``calibrated`` -- compute-matched: the iterations of this method that fit in ``multiplier ×`` the matched budget
  (:mod:`kdrepro.pipeline.matching`), read from the files written by ``kdrepro calibrate``. The run is then an
  iteration budget, so it is reproducible, while its wall-clock cost matches the other methods'.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdrepro.errors import ConfigError
from kdrepro.pipeline.matching import iterations_within, read_method

log = logging.getLogger("kdrepro.budget")
#: The over-budget warnings this process has given (every seed's run resolves the same budget).
_WARNED: set[tuple[Any, ...]] = set()


@dataclass(frozen=True)
class Budget:
    """A resolved budget: exactly one of ``iterations`` / ``seconds`` is set."""

    kind: str
    iterations: int | None = None
    seconds: float | None = None
    source: str = ""

    def progress(self, step: int, train_seconds: float) -> float:
        """Fraction of the budget used, in ``[0, 1]``."""
        if self.iterations is not None:
            return min(step / self.iterations, 1.0)
        assert self.seconds is not None
        return min(train_seconds / self.seconds, 1.0)

    def exhausted(self, step: int, train_seconds: float) -> bool:
        return self.progress(step, train_seconds) >= 1.0

    def describe(self) -> str:
        if self.iterations is not None:
            return f"{self.iterations} iterations ({self.kind}{', ' + self.source if self.source else ''})"
        return f"{self.seconds:g} training seconds"


def poly_lr(base_lr: float, progress: float, power: float = 0.9, min_lr: float = 1e-4) -> float:
    """mmsegmentation ``PolyLR``: ``(base − min) · (1 − progress)^power + min``."""
    progress = min(max(progress, 0.0), 1.0)
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


def _positive(value: Any, name: str, fix: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}; {fix}")
    return number


def _check_times(path: Path, method_name: str, entry: dict[str, Any], budget_seconds: float) -> None:
    """A calibration's times for one method must be times: one line naming the bad value (as `kdrepro plan`)."""
    _measured(entry.get("seconds_per_iteration"), f"{method_name}'s seconds_per_iteration", path)
    _measured(budget_seconds, "the matched budget_seconds", path)
    pretrain = entry.get("pretrain_seconds") or 0.0
    if not isinstance(pretrain, (int, float)) or not math.isfinite(pretrain) or pretrain < 0:
        raise ConfigError(f"calibration {path}: {method_name}'s pretrain_seconds is {pretrain!r}, not a time; the file "
                          "was edited or damaged: re-run `kdrepro calibrate`")


def _measured(value: Any, name: str, path: Path) -> float:
    """A measured time of a calibration: positive and finite, else a one-line error (as `kdrepro plan` gives)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"calibration {path}: {name} is {value!r}, not a positive time; the file was edited or "
                          "damaged: re-run `kdrepro calibrate`")
    return seconds


def resolve_budget(budget_cfg: Any, method_name: str, device: Any = None) -> Budget:
    """Turn a ``budget`` config into a :class:`Budget` for ``method_name``; with the run's ``device`` given, a
    calibration measured on another device type is refused (see :func:`calibrated_budget`)."""
    kind = budget_cfg.get("kind") if budget_cfg is not None else None
    if kind == "iterations":
        iterations = _positive(budget_cfg.get("iterations"), "budget.iterations", "set e.g. budget.iterations=1000")
        if iterations != int(iterations):
            raise ConfigError(f"budget.iterations must be a whole number, got {budget_cfg.get('iterations')!r}")
        return Budget("iterations", iterations=int(iterations))
    if kind == "seconds":
        seconds = _positive(budget_cfg.get("seconds"), "budget.seconds", "set e.g. budget.seconds=600")
        return Budget("seconds", seconds=seconds)
    if kind == "calibrated":
        multiplier = _positive(budget_cfg.get("multiplier", 1.0), "budget.multiplier", "use e.g. 1, 2, 4 or 8")
        path = budget_cfg.get("calibration")
        world_size = None if budget_cfg.get("allow_world_size_mismatch", False) else running_world_size()
        running_type = None if device is None or budget_cfg.get("allow_device_type_mismatch", False) else device_type(device)
        return calibrated_budget(Path(str(path)), method_name, multiplier, world_size, running_type)
    raise ConfigError(f"unknown budget kind {kind!r}; use budget=iterations, budget=seconds or budget=calibrated")


def running_world_size() -> int:
    """The number of processes of this run: torchrun's ``WORLD_SIZE``, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_type(device: Any) -> str:
    """The model of the device a run trains on: the GPU's name (``NVIDIA H100 80GB HBM3``) or the CPU's."""
    if str(getattr(device, "type", device)).split(":")[0] == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measured_device_type(path: Path) -> str | None:
    """The device type a calibration (table or folder) records; None for tables from before it was recorded."""
    try:
        table = json.loads((path / "budget.json" if path.is_dir() else path).read_text())
    except (OSError, ValueError):
        return None
    return table.get("device_type") if isinstance(table, dict) else None


def calibrated_budget(path: Path, method_name: str, multiplier: float = 1.0, world_size: int | None = None,
                      running_device_type: str | None = None) -> Budget:
    """The compute-matched iteration count of ``method_name`` from a calibration table: either the whole
    ``calibration.json`` or the folder beside it (``budget.json`` + ``<method>.json``, what DVC stages depend on).

    With ``world_size`` given, a calibration measured with another number of processes is refused (DDP's
    communication is part of every iteration's cost); tables from before the world size was recorded count as 1.
    With ``running_device_type`` given, a calibration measured on another GPU or CPU model is refused likewise
    (tables from before the device type was recorded are not checked)."""
    budget_seconds, measured_world, entry, known = read_method(path, method_name)
    measured_type = _measured_device_type(path)
    if world_size is not None and measured_world != world_size:
        launcher = f"torchrun --nproc_per_node={world_size} -m kdrepro" if world_size > 1 else "kdrepro"
        raise ConfigError(
            f"calibration {path} was measured with {measured_world} process(es) but this run has {world_size}; "
            f"re-calibrate with `{launcher} calibrate ...` or set budget.allow_world_size_mismatch=true"
        )
    if running_device_type is not None and measured_type is not None and measured_type != running_device_type:
        raise ConfigError(
            f"calibration {path} was measured on {measured_type} but this run trains on {running_device_type}; "
            "re-calibrate on this device type (on SLURM: the same gpu_type --constraint as the training jobs) "
            "or set budget.allow_device_type_mismatch=true"
        )
    if entry is None:
        raise ConfigError(
            f"calibration {path} has no entry for method {method_name!r} (it has: {', '.join(known)}); "
            f"add it to calibrate.methods and re-run `kdrepro calibrate`"
        )
    _check_times(path, method_name, entry, budget_seconds)
    iterations = iterations_within(multiplier * budget_seconds, entry)
    source = f"{multiplier:g} x {budget_seconds:.1f} s matched budget"
    if iterations < 1:  # one step costs more than the whole budget: train the one step, and say so once
        warning = ("the matched budget of %.1f s x %g buys no whole iteration of %r (%.2f s each): training 1",
                   budget_seconds, multiplier, method_name, float(entry["seconds_per_iteration"]))
        if warning not in _WARNED:
            _WARNED.add(warning)
            log.warning(*warning)
        iterations, source = 1, source + ", over budget: one iteration costs more than the budget"
    return Budget("calibrated", iterations=iterations, source=source)
